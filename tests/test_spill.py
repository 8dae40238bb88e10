"""spill_dir: where scoring keeps the run when it does not fit in max_memory (hydraclean.spill)."""

import shutil
import tempfile
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean import HydraLabelCleaner, contribution, spill
from hydraclean.spill import memory_backed, spill_location, warn_recomputed

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
/dev/vdb /tmp/on\\040disk ext4 rw 0 0
ramfs /scratch ramfs rw 0 0
"""

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


@pytest.mark.parametrize("path,held", [("/tmp", True), ("/tmp/x/y", True), ("/tmpfoo", False), ("/work", False),
                                       ("/tmp/on disk/x", False), ("/scratch/a", True), ("/", False)])
def test_memory_backed_reads_the_innermost_mount(mounts, path, held):
    assert memory_backed(path, mounts) is held


def test_memory_backed_is_false_without_a_mount_table(tmp_path):
    assert memory_backed("/tmp", str(tmp_path / "none")) is False


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """tempfile.gettempdir() -> a fresh folder on disk (what "auto" takes)."""
    folder = tmp_path / "temporary"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(spill, "memory_backed", lambda path: False)
    return folder


def test_spill_location_rules(temp_dir, monkeypatch):
    free = shutil.disk_usage(temp_dir).free
    assert spill_location(None, 10) is None
    assert spill_location("auto", 10) == str(temp_dir)
    assert spill_location("auto", int(0.5 * free) + 10**6) is None  # more than half of the free space
    assert spill_location(temp_dir, 10) == str(temp_dir)
    with pytest.raises(ValueError, match=r"about .* GB of the run in spill_dir=.*GB free.*spill_dir=None"):
        spill_location(temp_dir, free + 10**9)
    monkeypatch.setattr(spill, "memory_backed", lambda path: True)  # a tmpfs /tmp: not taken by "auto"
    assert spill_location("auto", 10) is None
    assert spill_location(temp_dir, 10) == str(temp_dir)  # named: the user's choice


def test_warn_recomputed_says_why_only_when_auto_could_not_take_the_run(temp_dir, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_recomputed(None, 10**15)
        warn_recomputed(str(temp_dir), 10**15)
        warn_recomputed("auto", 10)  # it had room: checkpoints were chosen for another reason
    with pytest.warns(UserWarning, match=r"more than half of its .* GB free: scoring recomputes the steps from "
                                         r"checkpoints.*spill_dir=None"):
        warn_recomputed("auto", 10**15)
    monkeypatch.setattr(spill, "memory_backed", lambda path: True)
    with pytest.warns(UserWarning, match="is held in memory"):
        warn_recomputed("auto", 10)


# -- the estimator ---------------------------------------------------------------------------------------


def group_norm_net():
    torch.manual_seed(0)
    # the second convolution's weights outweigh a sample's entries: the layer factors' sums do not fit, the
    # steps' captured entries (CapturedRun) are the layer route
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 32, 3), nn.Flatten(),
                         nn.Linear(32, 3))


def data():
    rng = np.random.RandomState(0)
    X = rng.randn(60, 1, 5, 5).astype(np.float32)
    return X, (X[:, 0, 2, 2] > 0).astype(int) + (X[:, 0, 1, 1] > 0).astype(int), np.arange(60) >= 45


@pytest.fixture
def routes(monkeypatch):
    """The route of every fit, with where it kept the run."""
    seen = []
    plan = contribution.plan_route

    def spy(*args, **kwargs):
        route = plan(*args, **kwargs)
        store = getattr(route, "store", None)
        seen.append((type(route).__name__, store.location if store is not None else route.location))
        return route

    monkeypatch.setattr(contribution, "plan_route", spy)
    return seen


def fit(**kw):
    X, y, mask = data()
    cleaner = HydraLabelCleaner(group_norm_net, max_epochs=2, batch_size=8, lr=0.05, random_state=0,
                                **{"max_memory": 20_000, **kw})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The trained model did not learn")
        return cleaner.fit(X, y, validation_mask=mask)


def same(a, b):
    for name in ("contribution_", "class_contribution_", "label_quality_"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name


def test_auto_keeps_the_steps_on_disk_when_they_do_not_fit_in_memory(temp_dir, tmp_path, routes):
    """The default: a temporary directory, the route of a named spill_dir bit for bit, no file left."""
    assert HydraLabelCleaner(nn.Linear(2, 2)).spill_dir == "auto"
    named = tmp_path / "named"
    named.mkdir()
    auto, by_name, recomputed = fit(), fit(spill_dir=str(named)), fit(spill_dir=None)
    assert routes == [("CapturedRun", "disk"), ("CapturedRun", "disk"), ("StoredRun", "checkpoints")]
    same(auto, by_name)
    np.testing.assert_allclose(auto.contribution_, recomputed.contribution_, rtol=1e-5,
                               atol=1e-6 * np.nanmax(np.abs(auto.contribution_)))
    assert not list(temp_dir.glob("hydraclean-*")) and not list(named.iterdir())


def test_auto_writes_nothing_when_every_steps_gradient_fits_in_memory(temp_dir, routes):
    """Disk only spares the walk from checkpoints: the steps' gradients in memory spare it as well."""
    fit(max_memory=200_000)
    assert routes == [("StoredRun", "memory")]
    assert not list(temp_dir.glob("hydraclean-*"))


def test_auto_without_room_recomputes_from_checkpoints_and_says_so(temp_dir, routes, monkeypatch):
    """Nothing written, the checkpoint route's results bit for bit, a warning naming the way out."""
    recomputed = fit(spill_dir=None)
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 100, 100))
    with pytest.warns(UserWarning, match=r"temporary directory .* more than half.*recomputes the steps from "
                                         r"checkpoints.*spill_dir=<a directory"):
        auto = fit()
    assert routes == [("StoredRun", "checkpoints")] * 2
    same(auto, recomputed)
    assert not list(temp_dir.glob("hydraclean-*"))


def test_a_checkpoint_resumes_only_the_route_that_saved_it(temp_dir, tmp_path):
    """With spill_dir="auto" the route can depend on free disk: a checkpoint of another route is refused,
    naming why (its saved state would not fit the new route)."""
    fit(spill_dir=None, checkpoint_dir=str(tmp_path / "ckpt"), keep_checkpoint=True)
    with pytest.raises(ValueError, match=r"other data or parameters \(they differ in: scoring route"):
        fit(checkpoint_dir=str(tmp_path / "ckpt"), keep_checkpoint=True)
    assert not list(temp_dir.glob("hydraclean-*"))


def test_auto_spills_an_attention_model_over_token_ids(temp_dir, routes):
    """The steps' entries of nn.MultiheadAttention (which name its projections' rows by slices) go to disk and
    come back: the checkpoint route's contributions up to float32 rounding."""
    from hydraclean.models import TokenTransformer

    rng = np.random.RandomState(0)
    X = rng.randint(0, 20, size=(60, 6))
    y = (X < 10).sum(1) % 3

    def fit_tokens(**kw):
        cleaner = HydraLabelCleaner(lambda: TokenTransformer(20, 3, 6, dim=8, heads=2, layers=1), max_epochs=2,
                                    batch_size=8, lr=0.05, random_state=0, max_memory=20_000, **kw)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The trained model did not learn")
            return cleaner.fit(X, y, validation_mask=np.arange(60) >= 45)

    auto, recomputed = fit_tokens(), fit_tokens(spill_dir=None)
    assert routes == [("CapturedRun", "disk"), ("StoredRun", "checkpoints")]
    scale = np.nanmax(np.abs(auto.class_contribution_))
    np.testing.assert_allclose(auto.class_contribution_, recomputed.class_contribution_, rtol=0, atol=1e-5 * scale)
    assert not list(temp_dir.glob("hydraclean-*"))
