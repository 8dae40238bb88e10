"""The hydraclean command line."""

import csv
import io
import warnings

import numpy as np
import pytest

from hydraclean.cli import main, run_demo
from hydraclean.datasets import load_digits_images, make_label_noise


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    X, y = load_digits_images()
    X, y = X[:300], y[:300]
    y_noisy, _ = make_label_noise(y, 0.2, random_state=0)
    Xv, yv = load_digits_images()
    np.savez(tmp / "train.npz", X=X, y=y_noisy, X_val=Xv[1000:1100], y_val=yv[1000:1100])
    names = np.array(list("abcdefghij"))
    with open(tmp / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label"] + [f"p{k}" for k in range(64)])
        for xi, yi in zip(X.reshape(300, -1), names[y_noisy]):
            w.writerow([yi] + [f"{v:.4f}" for v in xi])
    return tmp, X, y_noisy


FAST = ["--epochs", "2", "--batch-size", "32", "--lr", "0.05"]


def test_clean_npz_round_trip(digits_files, capsys):
    tmp, X, y = digits_files
    out = tmp / "clean.npz"
    assert main(["clean", str(tmp / "train.npz"), "-o", str(out), "--model", "small-cnn", "--drop-fraction", "0.2",
                 *FAST]) == 0
    kept = np.load(out)
    with open(tmp / "clean_report.csv") as f:
        report = list(csv.DictReader(f))
    flagged = np.array([int(r["flagged"]) for r in report], dtype=bool)
    assert len(report) == 300 and flagged.sum() == 60
    np.testing.assert_array_equal(kept["X"], X[~flagged])
    np.testing.assert_array_equal(kept["y"], y[~flagged])
    assert kept["X_val"].shape == (100, 1, 8, 8)  # the trusted set travels with the data
    scores = np.array([float(r["label_quality"]) for r in report])
    assert scores[flagged].max() <= scores[~flagged].min()
    assert "flagged 60 of 300 rows" in capsys.readouterr().out
    # the class-resolved columns: C(i) is their mean weighted by the validation class frequencies
    by_class = np.array([[float(r[f"class_contribution_{c}"]) for c in range(10)] for r in report])
    weights = np.bincount(np.load(tmp / "train.npz")["y_val"], minlength=10) / 100
    np.testing.assert_allclose(by_class @ weights, [float(r["contribution"]) for r in report], rtol=1e-5, atol=1e-9)
    assert [int(r["suggested_label"]) for r in report] == list(np.argmin(by_class, axis=1))


def test_clean_drop_fraction_auto_and_scoring(digits_files, capsys):
    tmp, X, y = digits_files
    out = tmp / "auto.npz"
    assert main(["clean", str(tmp / "train.npz"), "-o", str(out), "--model", "small-cnn", "--scoring",
                 "contribution", *FAST]) == 0
    with open(tmp / "auto_report.csv") as f:
        report = list(csv.DictReader(f))
    assert [r["label_quality"] for r in report] == [r["contribution"] for r in report]
    assert 0 < sum(int(r["flagged"]) for r in report) < 300
    with pytest.raises(SystemExit):
        main(["clean", str(tmp / "train.npz"), "-o", str(out), "--drop-fraction", "most"])
    assert "expected 'auto' or a fraction" in capsys.readouterr().err


def test_clean_csv_round_trip_keeps_rows_verbatim(digits_files, capsys):
    tmp, X, y = digits_files
    out = tmp / "clean.csv"
    # two epochs on 30 held-out rows do not learn: --write-anyway, since the round trip is the point here
    assert main(["clean", str(tmp / "train.csv"), "-o", str(out), "--model", "small-cnn", *FAST,
                 "--write-anyway"]) == 0
    assert "validation" in capsys.readouterr().err  # no trusted set: held out, with a warning
    src = (tmp / "train.csv").read_text().splitlines()
    dst = out.read_text().splitlines()
    with open(tmp / "clean_report.csv") as f:
        report = list(csv.DictReader(f))
    kept_rows = [src[1 + int(r["row"])] for r in report if r["flagged"] == "0"]
    assert dst[0] == src[0] and dst[1:] == kept_rows
    assert {r["label"] for r in report} <= set("abcdefghij")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["clean", "missing.npz", "-o", "x.npz"], "does not exist"),
        (["clean", "{tmp}/train.csv", "-o", "{tmp}/x.csv", "--label-column", "target"], "no column 'target'"),
        (["clean", "{tmp}/train.npz", "-o", "{tmp}/x.npz", "--model", "lenet5"], "28x28 or 32x32"),
        (["clean", "{tmp}/train.npz", "-o", "{tmp}/x.csv"], "both be .npz or both .csv"),
        (["clean", "{tmp}/train.npz", "-o", "{tmp}/no_such_dir/x.npz"], "folder {tmp}/no_such_dir does not exist"),
        (["clean", "{tmp}/train.npz", "-o", "{tmp}/x.npz", "--report", "{tmp}/nope/r.csv"], "nope does not exist"),
        (["clean", "{tmp}/text.npz", "-o", "{tmp}/x.npz"], "is not a valid .npz archive"),
        (["clean", "{tmp}/holes.csv", "-o", "{tmp}/x.csv"], "a missing value at row 3, column 'p1'"),
        (["clean", "{tmp}/words.csv", "-o", "{tmp}/x.csv"], "the non-numeric value 'abc' at row 2, column 'p0'"),
    ],
)
def test_clean_errors_are_one_clear_line(digits_files, capsys, argv, message):
    tmp, _, _ = digits_files
    (tmp / "text.npz").write_text("label,p0\na,1\n")
    (tmp / "holes.csv").write_text("label,p0,p1\na,1,2\nb,3,\n")
    (tmp / "words.csv").write_text("label,p0,p1\na,abc,2\nb,3,4\n")
    assert main([a.format(tmp=tmp) for a in argv]) == 2
    captured = capsys.readouterr()
    assert message.format(tmp=tmp) in captured.err and "Traceback" not in captured.err
    assert "flagged" not in captured.out  # failed before any training


def test_standardize_uses_training_statistics_and_keeps_the_files_verbatim(digits_files, capsys):
    from hydraclean.cli import standardize

    rng = np.random.RandomState(0)
    X, Xv = rng.normal(5.0, 3.0, size=(50, 4)), rng.normal(5.0, 3.0, size=(10, 4))
    X[:, 2] = 7.0  # constant: centred only
    Xs, Xvs = standardize(X, Xv)
    np.testing.assert_allclose(Xs.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Xs.std(0), [1, 1, 0, 1], atol=1e-12)
    np.testing.assert_allclose(Xvs, (Xv - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0), rtol=1e-12)
    tmp, _, _ = digits_files
    out = tmp / "scaled.csv"
    assert main(["clean", str(tmp / "train.csv"), "-o", str(out), "--standardize", *FAST]) == 0
    kept = out.read_text().splitlines()
    assert kept[0] == (tmp / "train.csv").read_text().splitlines()[0]
    assert set(kept[1:]) <= set((tmp / "train.csv").read_text().splitlines()[1:])


def test_version(capsys):
    import hydraclean

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hydraclean {hydraclean.__version__}"


def test_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "clean" in out


def test_demo_prints_the_detection_table():
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = run_demo(epochs=2, out=buf)
    text = buf.getvalue()
    assert "AUROC" in text and "HYDRA (defaults)" in text and "HYDRA paper C(i)" in text
    assert {"no cleaning", "HYDRA (defaults)", "HYDRA paper C(i), drop 20%", "HYDRA cluster",
            "true labels (oracle)"} == {r["method"] for r in rows}
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows if "auroc" in r)


def test_a_model_that_did_not_learn_writes_nothing_and_exits_3(digits_files, capsys):
    """Raw-scale columns without --standardize: the warning's text, exit status 3, no file; --write-anyway
    writes them with status 0."""
    tmp, X, y = digits_files
    raw = tmp / "raw.npz"
    np.savez(raw, X=X.reshape(len(X), -1) * 1e4 + 5e5, y=y)
    out = tmp / "raw_clean.npz"
    assert main(["clean", str(raw), "-o", str(out), "--lr", "1e-9", "--epochs", "1"]) == 3
    err = capsys.readouterr().err
    assert "did not learn" in err and "nothing written" in err and "--write-anyway" in err
    assert not out.exists() and not (tmp / "raw_clean_report.csv").exists()
    assert main(["clean", str(raw), "-o", str(out), "--lr", "1e-9", "--epochs", "1", "--write-anyway"]) == 0
    assert out.exists()


def test_the_exit_codes_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["clean", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 the cleaned file", "2 bad arguments", "3 the model did not learn", "130 interrupted"):
        assert code in text


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_prints_one_line_and_exits_130(digits_files, tmp_path, checkpoint):
    """SIGINT to a running `hydraclean clean`: one line saying where the run is saved (or that nothing is),
    exit status 130, nothing written."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    tmp, _, _ = digits_files
    out = tmp_path / "out.npz"
    argv = [sys.executable, "-m", "hydraclean.cli", "clean", str(tmp / "train.npz"), "-o", str(out), "--epochs",
            "60", "--batch-size", "4", "--lr", "0.05", "-v"]
    if checkpoint:
        argv += ["--checkpoint-dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr_chunks, training = [], threading.Event()

    def read_stderr():  # the progress bar's first line says training began (imports can take seconds on CI)
        tail = ""
        for chunk in iter(lambda: proc.stderr.read(1), ""):
            stderr_chunks.append(chunk)
            tail = (tail + chunk)[-9:]
            if tail == "training:":
                training.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    started = tmp_path / "ckpt" / "hydraclean-checkpoint.pt"  # the first epoch is over
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (
            training.is_set() and (not checkpoint or started.exists())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(stderr_chunks)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("hydraclean clean: interrupted;") and "Traceback" not in stderr
    assert (str(tmp_path / "ckpt") in lines[-1]) == checkpoint and not out.exists()


def test_ctrl_c_inside_an_eval_still_exits_130(tmp_path):
    """Under `python -m`, CPython ends the process by SIGINT (status -2, not 130) once a plain KeyboardInterrupt
    has left an `eval` of a string, even when the program caught it; torch's TorchScript compiler evaluates
    strings during the first forward-mode step, where a Ctrl-C on CI once landed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "interrupt_in_eval.py").write_text(
        "import os, signal, time\n"
        "import hydraclean.cli as cli\n"
        "def run_clean(args):\n"
        "    eval('os.kill(os.getpid(), signal.SIGINT) or time.sleep(5)')\n"
        "cli.run_clean = run_clean\n"
        "raise SystemExit(cli.main(['clean', 'unused.npz', '-o', 'out.npz']))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupt_in_eval"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hydraclean clean: interrupted;")
