"""Offline data: scikit-learn's digits as images, Fashion-MNIST from local IDX files,
torchvision datasets from local files, synthetic topic documents as token ids, and seeded label noise.

Nothing here downloads.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.utils import check_random_state

__all__ = ["load_digits_images", "load_fashion_mnist", "load_torchvision", "make_label_noise", "make_topic_tokens"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as images.

    Returns
    -------
    X : ndarray of shape (1797, 1, 8, 8), float32, values in [0, 1]
    y : ndarray of shape (1797,), int64, digits 0-9
    """
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]
    return X, digits.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from its standard IDX files; never downloads.

    Looks in ``data_dir``, then ``$HYDRACLEAN_DATA``, then
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``),
    each also in torchvision's layout ``<dir>/FashionMNIST/raw``.

    Parameters
    ----------
    data_dir : path, optional
    split : {"train", "test"}

    Returns
    -------
    X : ndarray of shape (n, 1, 28, 28), float32 in [0, 1]
        60,000 images for "train", 10,000 for "test".
    y : ndarray of shape (n,), int64

    Raises
    ------
    FileNotFoundError
        With the places searched and how to get the files.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    roots = [Path(p) for p in (data_dir, os.environ.get("HYDRACLEAN_DATA")) if p] + [DEBIAN_FASHION_MNIST]
    candidates = [d for root in roots for d in (root, root / "FashionMNIST" / "raw")]
    images_stem, labels_stem = _FASHION_FILES[split]
    for folder in candidates:
        images, labels = _find_idx(folder, images_stem), _find_idx(folder, labels_stem)
        if images and labels:
            X = (_read_idx(images).astype(np.float32) / 255.0)[:, None]
            return X, _read_idx(labels).astype(np.int64)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({images_stem}[.gz], {labels_stem}[.gz]) were not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install Debian's package (apt-get install dataset-fashion-mnist), or put the IDX files "
        "in a folder and pass data_dir= or set HYDRACLEAN_DATA."
    )


def load_torchvision(name: str, root: str | os.PathLike, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST or CIFAR-10 through torchvision's dataset classes, from files already in ``root``.

    Parameters
    ----------
    name : {"MNIST", "FashionMNIST", "CIFAR10"}
    root : path
        torchvision's dataset root; ``download`` is never requested.
    train : bool

    Returns
    -------
    X : ndarray of shape (n, channels, height, width), float32 in [0, 1]
    y : ndarray of shape (n,), int64
    """
    import torchvision

    classes = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST,
               "CIFAR10": torchvision.datasets.CIFAR10}
    if name not in classes:
        raise ValueError(f"name must be one of {sorted(classes)}, got {name!r}.")
    try:
        ds = classes[name](root=str(root), train=train, download=False)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{name} files were not found under {root} ({exc}). hydraclean never downloads: fetch "
            f"the dataset with torchvision on a machine with internet access and copy the folder here."
        ) from exc
    data = np.asarray(ds.data, dtype=np.float32) / 255.0
    X = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(X), np.asarray(ds.targets, dtype=np.int64)


def make_topic_tokens(
    n_samples: int,
    n_classes: int = 4,
    vocab_size: int = 1000,
    length: int = 32,
    topic_words: int = 40,
    topic_share: float = 0.25,
    random_state=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic documents as token ids: each class is a topic with words of its own.

    Every class owns ``topic_words`` ids of the vocabulary; a document of
    class ``c`` draws each of its ``length`` tokens from class ``c``'s words
    with probability ``topic_share`` (uniformly), else from the whole
    vocabulary by Zipf's law (the shared background words). Nothing is
    downloaded.

    Parameters
    ----------
    n_samples : int
    n_classes : int, default=4
    vocab_size : int, default=1000
        Must hold every class's topic words.
    length : int, default=32
        Tokens per document.
    topic_words : int, default=40
    topic_share : float, default=0.25
        Expected share of a document's tokens that are its topic's words.
    random_state : int, RandomState instance or None

    Returns
    -------
    X : ndarray of shape (n_samples, length), int64
        Token ids in ``0..vocab_size-1``.
    y : ndarray of shape (n_samples,), int64
        Classes ``0..n_classes-1``, balanced.
    """
    if n_classes * topic_words > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} cannot hold {n_classes} topics of {topic_words} words; "
                         "raise vocab_size or lower topic_words.")
    rng = check_random_state(random_state)
    y = rng.permutation(np.arange(n_samples) % n_classes).astype(np.int64)
    topics = rng.permutation(vocab_size)[: n_classes * topic_words].reshape(n_classes, topic_words)
    background = 1.0 / np.arange(1, vocab_size + 1)
    background = rng.permutation(background / background.sum())
    X = rng.choice(vocab_size, size=(n_samples, length), p=background)
    topical = rng.random_sample((n_samples, length)) < topic_share
    words = topics[y[:, None], rng.randint(topic_words, size=(n_samples, length))]
    X[topical] = words[topical]
    return X.astype(np.int64), y


def make_label_noise(
    y, rate: float, kind: str = "symmetric", random_state=None, pairs=None
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * n_c)`` labels of every class ``c``.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Clean labels (any values).
    rate : float in [0, 1]
        Fraction of each class to flip.
    kind : {"symmetric", "pairs", "permutation"}, default="symmetric"
        ``"symmetric"``: each flipped label is drawn uniformly from the other
        classes. ``"pairs"``: class k becomes class k+1 (cyclically, in sorted
        order), or with ``pairs`` each named class becomes its partner.
        ``"permutation"``: one random permutation of the classes without
        fixed points, drawn from ``random_state``.
    random_state : int, RandomState or None
    pairs : sequence of (label, label), optional
        With ``kind="pairs"``: disjoint pairs of labels (values of ``y``) that
        are confused both ways, e.g. the look-alike classes ``[(3, 5), (4, 9)]``;
        classes in no pair keep their labels.

    Returns
    -------
    y_noisy : ndarray of shape (n_samples,)
        A copy of ``y`` with the flips.
    noise_mask : ndarray of shape (n_samples,), bool
        True where the label was changed.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    if kind not in ("symmetric", "pairs", "permutation"):
        raise ValueError(f"kind must be 'symmetric', 'pairs' or 'permutation', got {kind!r}.")
    rng = check_random_state(random_state)
    y = np.asarray(y)
    classes, codes = np.unique(y, return_inverse=True)
    k = classes.size
    if k < 2:
        raise ValueError("make_label_noise needs at least 2 classes.")
    if pairs is not None and kind != "pairs":
        raise ValueError(f"pairs is used with kind='pairs' only, got kind={kind!r}.")
    if kind == "permutation":
        mapping = rng.permutation(k)
        while np.any(mapping == np.arange(k)):
            mapping = rng.permutation(k)
    elif kind == "pairs":
        mapping = (np.arange(k) + 1) % k if pairs is None else _pair_mapping(classes, pairs)
    noisy = codes.copy()
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in range(k):
        if kind != "symmetric" and mapping[c] == c:  # a class in no pair
            continue
        members = np.flatnonzero(codes == c)
        flip = rng.choice(members, size=int(round(rate * members.size)), replace=False)
        if kind == "symmetric":
            noisy[flip] = (c + rng.randint(1, k, size=flip.size)) % k
        else:
            noisy[flip] = mapping[c]
        mask[flip] = True
    return classes[noisy], mask


def _pair_mapping(classes: np.ndarray, pairs) -> np.ndarray:
    """Class codes -> partner codes for disjoint label pairs; unpaired classes map to themselves."""
    mapping = np.arange(classes.size)
    seen: set = set()
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"pairs must hold pairs of two different labels, got {pair!r}.")
        missing = [label for label in pair if label not in classes]
        if missing:
            raise ValueError(f"pairs names labels {missing} that are not in y.")
        if seen & set(pair):
            raise ValueError(f"pairs must be disjoint; {pair!r} repeats a label.")
        seen |= set(pair)
        a, b = np.searchsorted(classes, pair)
        mapping[a], mapping[b] = b, a
    return mapping
