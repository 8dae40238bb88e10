"""Offline data loaders, label noise and the reference networks."""

import gzip

import numpy as np
import pytest
import torch

from hydraclean.datasets import load_digits_images, load_fashion_mnist, load_torchvision, make_label_noise
from hydraclean.models import MLP, LeNet5, SmallCNN, count_parameters, densenet_bc_40


def test_digits_images():
    X, y = load_digits_images()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0 and set(y) == set(range(10))


@pytest.mark.parametrize("kind", ["symmetric", "pairs", "permutation"])
def test_label_noise_exact_counts_per_class(kind):
    y = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    noisy, mask = make_label_noise(y, 0.3, kind=kind, random_state=0)
    assert np.array_equal(mask, noisy != y)
    for c, n in zip(range(5), [10, 20, 30, 40, 50]):
        assert mask[y == c].sum() == round(0.3 * n)
    if kind == "pairs":
        assert np.array_equal(noisy[mask], (y[mask] + 1) % 5)
    if kind == "permutation":
        mapping = {int(a): int(b) for a, b in zip(y[mask], noisy[mask])}
        assert len(set(mapping.values())) == len(mapping)  # one target per class
    again, _ = make_label_noise(y, 0.3, kind=kind, random_state=0)
    assert np.array_equal(noisy, again)


def test_named_pairs_swap_both_ways_and_leave_other_classes():
    y = np.repeat(np.array([10, 20, 30, 40, 50]), 20)
    noisy, mask = make_label_noise(y, 0.25, kind="pairs", pairs=[(20, 50), (10, 30)], random_state=0)
    assert not mask[y == 40].any()
    for a, b in [(20, 50), (50, 20), (10, 30), (30, 10)]:
        assert mask[y == a].sum() == 5 and set(noisy[(y == a) & mask]) == {b}
    for bad, match in [([(20, 20)], "two different"), ([(20, 60)], "not in y"), ([(10, 20), (20, 30)], "disjoint")]:
        with pytest.raises(ValueError, match=match):
            make_label_noise(y, 0.25, kind="pairs", pairs=bad)
    with pytest.raises(ValueError, match="kind='pairs' only"):
        make_label_noise(y, 0.25, pairs=[(10, 20)])


def test_symmetric_noise_is_uniform_over_other_classes_and_keeps_label_values():
    y = np.array(["a", "b", "c", "d"] * 3000)
    noisy, mask = make_label_noise(y, 0.5, random_state=1)
    assert set(noisy) == set(y)
    flipped_from_a = noisy[(y == "a") & mask]
    counts = np.array([np.sum(flipped_from_a == c) for c in "bcd"])
    assert counts.min() / counts.max() > 0.8
    with pytest.raises(ValueError, match="rate"):
        make_label_noise(y, 1.5)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_data_dir_and_env(tmp_path, monkeypatch):
    images = np.random.RandomState(0).randint(0, 256, size=(5, 28, 28))
    labels = np.array([0, 3, 9, 1, 2])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    X, y = load_fashion_mnist(tmp_path, split="test")
    assert X.shape == (5, 1, 28, 28) and X.dtype == np.float32
    np.testing.assert_allclose(X[:, 0] * 255, images)
    np.testing.assert_array_equal(y, labels)
    monkeypatch.setenv("HYDRACLEAN_DATA", str(tmp_path))
    assert load_fashion_mnist(split="test")[0].shape == (5, 1, 28, 28)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr("hydraclean.datasets.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("HYDRACLEAN_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_torchvision_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_torchvision("MNIST", tmp_path)


def test_paper_parameter_counts():
    assert count_parameters(LeNet5()) == 61_706  # 28x28 with padding 2, or 32x32
    assert count_parameters(LeNet5(input_size=32)) == 61_706
    assert count_parameters(densenet_bc_40()) == 176_122  # 3-channel 32x32 (CIFAR-10)


@pytest.mark.parametrize(
    "model,shape",
    [(LeNet5(), (2, 1, 28, 28)), (LeNet5(input_size=32), (2, 1, 32, 32)), (SmallCNN(), (2, 1, 8, 8)),
     (MLP(64, 10), (2, 64)), (MLP(64, 10, dropout=0.1), (2, 1, 8, 8)), (densenet_bc_40(), (2, 3, 32, 32))],
)
def test_models_output_logits(model, shape):
    assert model(torch.zeros(shape)).shape == (2, 10)
