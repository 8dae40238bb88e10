"""Long runs survive: checkpoints at every epoch and on Ctrl-C, resumed bit for bit, refused when they differ."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hydraclean import HydraLabelCleaner
from hydraclean.checkpoint import Checkpoints

from . import interrupted_fit as child

CHILD = Path(child.__file__)
PER_EPOCH = child.N_TRAIN // child.BATCH
pytestmark = pytest.mark.filterwarnings("ignore:The trained model did not learn")


def run_child(strategy, kind, checkpoint_dir, out, interrupt_after=None):
    """Run the slow fit in a subprocess; with ``interrupt_after`` (seconds after the first checkpoint appears),
    send it SIGINT then. Returns the exit status."""
    env = {**os.environ, "PYTHONPATH": str(CHILD.parent.parent)}
    if interrupt_after is not None:
        env["HYDRACLEAN_SLOW_STEPS"] = "1"
    argv = [sys.executable, str(CHILD), strategy, kind, str(checkpoint_dir), str(out), str(torch.get_num_threads())]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    if interrupt_after is not None:
        first = Path(checkpoint_dir) / "hydraclean-checkpoint.pt"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 130), err
    return proc.returncode


def saved_step(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / "hydraclean-checkpoint.pt", weights_only=True)["state"]["step"]


# each strategy and each input kind once (pairwise: the four combinations took 86 s of CI's test time)
@pytest.mark.parametrize("strategy,kind", [("drop", "array"), ("cluster", "dataset")])
def test_a_fit_interrupted_mid_epoch_resumes_to_the_uninterrupted_results_bit_for_bit(strategy, kind, tmp_path):
    uninterrupted = child.arrays(child.fit(strategy, kind, None))
    ckpt = tmp_path / "run"
    # SIGINT half an epoch after the first checkpoint (end of epoch 1): inside epoch 2
    assert run_child(strategy, kind, ckpt, tmp_path / "a.npz", interrupt_after=PER_EPOCH * child.STEP_SECONDS / 2) == 130
    step = saved_step(ckpt)
    assert PER_EPOCH < step < 2 * PER_EPOCH  # saved where it stopped, mid-epoch, not at the epoch's end
    assert not (tmp_path / "a.npz").exists()
    assert run_child(strategy, kind, ckpt, tmp_path / "b.npz") == 0
    resumed = np.load(tmp_path / "b.npz")
    assert set(resumed.files) == set(uninterrupted)
    for name, value in uninterrupted.items():
        assert np.array_equal(resumed[name], value, equal_nan=True), name
    assert not any(ckpt.iterdir())  # removed after the successful fit


def test_an_interrupt_while_scoring_resumes_at_scoring(tmp_path, monkeypatch):
    """Training was saved once over; an interruption in scoring costs only the scoring."""
    from hydraclean import contribution

    calls = []
    real = contribution.train
    monkeypatch.setattr(contribution, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = child.arrays(child.fit("drop", "array", None))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(contribution, "_directions", interrupt)
        with pytest.raises(KeyboardInterrupt):
            child.fit("drop", "array", tmp_path)
    assert torch.load(tmp_path / "hydraclean-checkpoint.pt", weights_only=True)["state"]["stage"] == "trained"
    calls.clear()
    resumed = child.arrays(child.fit("drop", "array", tmp_path))
    assert calls == []  # no training
    for name, value in full.items():
        assert np.array_equal(resumed[name], value, equal_nan=True), name


def _digits():
    rng = np.random.RandomState(0)
    X = rng.randn(120, 8).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0).astype(int)
    return X, y


def linear():
    return torch.nn.Linear(8, 3)  # initialised under random_state: the same module in every fit


def _cleaner(checkpoint_dir, **kw):
    params = dict(module=linear, max_epochs=3, batch_size=16, lr=0.1, random_state=0, checkpoint_dir=checkpoint_dir,
                  keep_checkpoint=True)
    return HydraLabelCleaner(**{**params, **kw})


@pytest.mark.parametrize(
    "change,differs",
    [(dict(lr=0.2), "parameter lr"), (dict(data=True), "X"), (dict(optimizer=torch.optim.Adam), "parameter optimizer"),
     (dict(module=torch.nn.Linear(8, 3)), "module")],
)
def test_a_checkpoint_from_other_data_or_parameters_is_refused(tmp_path, change, differs):
    X, y = _digits()
    _cleaner(tmp_path).fit(X[:90], y[:90], X_val=X[90:], y_val=y[90:])
    other = dict(change)
    X2 = X + 1.0 if other.pop("data", False) else X
    est = _cleaner(tmp_path, **other)
    with pytest.raises(ValueError, match=f"other data or parameters.*{differs}.*another checkpoint_dir"):
        est.fit(X2[:90], y[:90], X_val=X2[90:], y_val=y[90:])
    assert not hasattr(est, "contribution_")


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    X, y = _digits()
    first = _cleaner(tmp_path).fit(X[:90], y[:90], X_val=X[90:], y_val=y[90:])
    latest = tmp_path / "hydraclean-checkpoint.pt"
    assert (tmp_path / "hydraclean-checkpoint.previous.pt").exists()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a crash while writing
    with pytest.warns(UserWarning, match="cannot be read.*the one before it"):
        again = _cleaner(tmp_path).fit(X[:90], y[:90], X_val=X[90:], y_val=y[90:])
    np.testing.assert_array_equal(again.contribution_, first.contribution_)


def test_saving_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    checkpoints = Checkpoints(tmp_path, {"a": "1"})
    checkpoints.save({"x": torch.ones(3)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save({"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hydraclean-checkpoint.pt"]
    assert torch.equal(checkpoints.load()["x"], torch.ones(3))


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once():
    # Python's own handler first: a job started in the background inherits SIGINT ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        checkpoints = Checkpoints("unused", {})
        with checkpoints.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert checkpoints.interrupted
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_interrupt_without_checkpoint_leaves_the_estimator_as_it_was(tmp_path):
    """KeyboardInterrupt goes through; nothing fitted, the spill file removed."""
    X, y = _digits()

    class Stop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(8, 3), 0

        def forward(self, x):
            self.calls += self.training
            if self.calls > 7:
                raise KeyboardInterrupt
            return self.lin(x)

    est = HydraLabelCleaner(Stop(), max_epochs=3, batch_size=16, random_state=0, max_memory=300,
                            spill_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X[:90], y[:90], X_val=X[90:], y_val=y[90:])
    assert not hasattr(est, "contribution_") and not list(tmp_path.iterdir())


def test_a_fit_that_would_not_fit_on_its_device_is_refused_before_training(monkeypatch):
    """The pre-flight adds what the run keeps, the validation directions and the results."""
    from hydraclean import contribution

    monkeypatch.setattr(contribution, "_free_memory", lambda device: 1_000)
    X, y = _digits()
    est = HydraLabelCleaner(torch.nn.Linear(8, 3), max_epochs=3, batch_size=16, random_state=0)
    with pytest.raises(ValueError, match=r"would hold about .* MB on cpu \(.*kept from the run.*validation "
                                         r"directions.*results\), but 0 MB are free.*Lower max_memory"):
        est.fit(X[:90], y[:90], X_val=X[90:], y_val=y[90:])
    assert not hasattr(est, "contribution_")

