"""Every example runs end to end at small size."""

import subprocess
import sys
from pathlib import Path

import pytest

from hydraclean.datasets import load_fashion_mnist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def fashion_mnist_available() -> bool:
    try:
        load_fashion_mnist(split="test")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.parametrize(
    "script",
    [
        "digits_sklearn_pipeline.py",
        "digits_imblearn_pipeline.py",
        "explain_prediction.py",
        "image_folder.py",
        "frozen_backbone.py",
        "text_token_ids.py",
        pytest.param("fashion_mnist_lenet5.py", marks=pytest.mark.skipif(
            not fashion_mnist_available(), reason="Fashion-MNIST files absent (apt-get install dataset-fashion-mnist)")),
    ],
)
def test_example_runs(script, tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--small"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def test_distributed_example_runs_with_torchrun_as_written(tmp_path):
    """The docs' command: two processes on this machine (gloo), one thread each."""
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(EXAMPLES / "distributed_fit.py"),
                          "--small"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes" in out.stdout and "identical contributions on every rank: True" in out.stdout
