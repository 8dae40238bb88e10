"""Dataset input: the recorded batches loaded by index, random transforms reproduced in every pass."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from hydraclean import HydraLabelCleaner
from hydraclean.batches import DatasetInputs, _SeededItems, sample_seed
from hydraclean.contribution import fit_contributions
from hydraclean.training import plan_trajectory

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")
pytestmark = pytest.mark.filterwarnings("ignore:The trained model did not learn")


class Augmented(Dataset):
    """Images with a random flip and random noise, plus a label; drawn from torch's default generator, Python's
    ``random`` or numpy's global generator, as augmentation code does."""

    def __init__(self, X, y, source="torch"):
        self.X, self.y, self.source = X, y, source

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.X[i]
        if self.source == "torch":
            flip, noise = torch.rand(()) < 0.5, torch.randn(x.shape, dtype=x.dtype)
        elif self.source == "python":
            flip = random.random() < 0.5
            noise = torch.tensor([random.gauss(0.0, 1.0) for _ in range(x.numel())], dtype=x.dtype).reshape(x.shape)
        else:
            flip, noise = np.random.rand() < 0.5, torch.as_tensor(np.random.randn(*x.shape), dtype=x.dtype)
        return (x.flip(-1) if flip else x) + 0.1 * noise, int(self.y[i])


def images(n=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.arange(n) % 3


SOURCES = ["torch", "python", "numpy"]


@pytest.mark.parametrize("source", SOURCES)
def test_sample_seeds_depend_on_the_step_and_the_index_only(source):
    assert sample_seed(5, 7) == sample_seed(5, 7)
    seeds = {sample_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500 and all(0 <= x < 2**63 for x in seeds)
    items = _SeededItems(Augmented(*images(), source))
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    before = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    assert torch.equal(items[(3, 4)], items[(3, 4)])
    assert not torch.equal(items[(3, 4)], items[(4, 4)])
    # the caller's generators are left alone
    assert torch.equal(torch.random.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), before[2]))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("max_memory", [10**9, 3000], ids=["training factors", "checkpoints"])
def test_augmented_contributions_equal_the_recurrence_on_the_materialised_batches(max_memory, source):
    """Training and every later pass see the augmented inputs of each step: checked against batches built apart,
    whichever generator the augmentation draws from."""
    X, y = images()
    Xv, yv = images(6, seed=1)
    dataset = Augmented(X, y, source)
    traj = plan_trajectory(len(y), batch_size=4, max_epochs=2, lr=0.1, lr_schedule="constant", momentum=0.9,
                           weight_decay=0.01, seed=0)
    items = _SeededItems(dataset)

    def materialised(t, idx):
        return torch.stack([items[(int(traj.seeds[t]), int(i))] for i in idx])

    module = ref.tiny_conv_net()
    C_ref, _, _ = ref.free_recurrence(module, X, y, Xv, yv, traj, CE, inputs=materialised)
    inputs = DatasetInputs(dataset, torch.device("cpu"), torch.float64)
    result = fit_contributions(module, inputs, y, Xv, yv, criterion=CE, trajectory=traj, max_memory=max_memory)
    assert ref.relative_error(result.contribution, C_ref) < 1e-9
    # without the per-sample seeds the augmentation differs: the check above can fail
    unseeded = ref.free_recurrence(module, X, y, Xv, yv, traj, CE, inputs=lambda t, idx: torch.stack(
        [dataset[int(i)][0] for i in idx]))[0]
    assert ref.relative_error(unseeded, C_ref) > 1e-3


def digits(n=200):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16.0).astype(np.float32), y[:n]


def mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


@pytest.mark.parametrize("strategy", ["drop", "cluster"])
def test_a_dataset_gives_the_array_fit_bit_for_bit(strategy):
    X, y = digits()
    kw = dict(max_epochs=2, batch_size=16, random_state=0, strategy=strategy, n_val_features=20)
    mask = np.arange(len(y)) >= 160
    arrays = HydraLabelCleaner(mlp, **kw).fit(X, y, validation_mask=mask)
    dataset = TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    fitted = HydraLabelCleaner(mlp, **kw).fit(dataset, validation_mask=mask)  # labels read from the pairs
    for name in ("contribution_", "class_contribution_", "label_quality_", "label_issues_", "contribution_matrix_"):
        np.testing.assert_array_equal(getattr(fitted, name), getattr(arrays, name), err_msg=name)
    assert fitted.input_shape_ == (64,)
    assert fitted._train_data[0].dataset is dataset  # a reference to the user's data, not a copy
    kept = fitted.transform(dataset)
    assert kept is dataset
    subset = HydraLabelCleaner(mlp, **kw).fit_transform(dataset, validation_mask=mask)
    assert isinstance(subset, Subset) and len(subset) == int(arrays.support_.sum())
    explained = fitted.explain(TensorDataset(torch.as_tensor(X[160:170]), torch.as_tensor(y[160:170])), k=3)
    np.testing.assert_allclose(explained.contribution_matrix, arrays.explain(X[160:170], y[160:170], k=3)
                               .contribution_matrix, rtol=0, atol=0)


def test_validation_dataset_workers_and_targets():
    X, y = digits()

    class WithTargets(TensorDataset):
        def __init__(self, X, y):
            super().__init__(torch.as_tensor(X))
            self.targets = y

    kw = dict(max_epochs=2, batch_size=16, random_state=0)
    arrays = HydraLabelCleaner(mlp, **kw).fit(X[:160], y[:160], X_val=X[160:], y_val=y[160:])
    fitted = HydraLabelCleaner(mlp, num_workers=2, **kw).fit(WithTargets(X[:160], y[:160]),
                                                             X_val=WithTargets(X[160:], y[160:]))
    np.testing.assert_array_equal(fitted.contribution_, arrays.contribution_)


def test_a_dataset_without_labels_asks_for_y():
    X, y = digits(40)
    with pytest.raises(ValueError, match="pass the labels as y"):
        HydraLabelCleaner(mlp, max_epochs=1).fit(TensorDataset(torch.as_tensor(X)))
    with pytest.raises(ValueError, match="requires y to be passed"):
        HydraLabelCleaner(mlp, max_epochs=1).fit(X)


def test_a_dataset_matches_the_array_fit_of_a_convolutional_model_to_rounding():
    """From an array the first convolution sums its output gradients over the run; from a Dataset it forms
    per-sample gradients every step: the same contributions up to float32 rounding, and the same flags."""
    X, y = digits()
    X = X.reshape(-1, 1, 8, 8)
    kw = dict(max_epochs=3, batch_size=16, random_state=0)
    mask = np.arange(len(y)) >= 160
    arrays = HydraLabelCleaner(small_cnn, **kw).fit(X, y, validation_mask=mask)
    fitted = HydraLabelCleaner(small_cnn, **kw).fit(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)),
                                               validation_mask=mask)
    got, expected = fitted.class_contribution_[~mask], arrays.class_contribution_[~mask]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)
    assert not np.array_equal(got, expected)  # the routes differ, so rounding does
    np.testing.assert_array_equal(fitted.label_issues_, arrays.label_issues_)
