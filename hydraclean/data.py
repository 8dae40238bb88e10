"""Turning user inputs into checked arrays, and the trusted validation split.

Inputs are copied, never written to: numpy arrays (any trailing shape,
read-only ones included), torch tensors, nested lists.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils import _safe_indexing

__all__ = [
    "check_features",
    "check_labels",
    "check_token_ids",
    "dataset_labels",
    "has_token_dtype",
    "input_dtype",
    "is_dataset",
    "resolve_validation_rows",
    "scale_mismatch",
    "select_rows",
    "takes_token_ids",
]


def check_features(X, name: str = "X", copy: bool = True) -> np.ndarray:
    """Return ``X`` as a finite, real, numeric numpy array of shape (n_samples, ...).

    Parameters
    ----------
    X : array-like, torch tensor or nested list
    name : str
        How error messages call it.
    copy : bool, default=True
        Always copy (the result may then be handed to torch safely); False
        only checks, avoiding a copy where possible.

    Raises
    ------
    TypeError
        When ``X`` is sparse or not numeric.
    ValueError
        When ``X`` is complex, empty, has no features, is 1-D or scalar, or
        holds NaN or inf.
    """
    if isinstance(X, torch.utils.data.DataLoader):
        raise TypeError(
            f"{name} is a torch DataLoader; pass its map-style Dataset ({name}=loader.dataset): hydraclean loads "
            "the batches of the recorded run itself (num_workers sets the loader's workers)."
        )
    if isinstance(X, torch.utils.data.IterableDataset):
        raise TypeError(
            f"{name} is a torch IterableDataset; hydraclean loads the recorded batches by index: pass a map-style "
            "Dataset (with __getitem__ and __len__) or one array."
        )
    if isinstance(X, torch.utils.data.Dataset):
        raise TypeError(
            f"{name} is a torch Dataset without a length; pass a map-style Dataset (with __getitem__ and __len__) "
            f"or one array, e.g. {name} = torch.stack([x for x, _ in dataset])."
        )
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name} is a sparse matrix; hydraclean needs dense input: pass {name}.toarray().")
    try:
        arr = np.array(X) if copy else np.asarray(X)
    except ValueError as exc:
        raise ValueError(f"{name} could not be turned into an array ({exc}); rows must share one shape.") from exc
    if np.iscomplexobj(arr):
        raise ValueError(f"Complex data not supported: {name} is complex; hydraclean needs real numbers.")
    if arr.dtype == object:
        first = next((k for k, v in enumerate(arr.reshape(-1)) if _is_missing(v)), None)
        if first is not None:
            raise ValueError(f"{name} has a missing value (None, pd.NA or NaN) at {_where(arr.shape, first)}; "
                             "impute or drop the missing values first (e.g. sklearn.impute.SimpleImputer).")
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must hold numbers, but its objects could not be converted ({exc}); encode "
                "categorical or text columns as numbers before cleaning."
            ) from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(
            f"{name} must hold numbers, got dtype {arr.dtype}; encode categorical or text columns "
            "as numbers before cleaning."
        )
    if arr.ndim < 2:
        raise ValueError(
            f"Expected a 2D array or more, got {arr.ndim}D {name}. Reshape your data either using "
            f"{name}.reshape(-1, 1) if it has a single feature or {name}.reshape(1, -1) if it holds a "
            "single sample; images go as (n_samples, channels, height, width)."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: 0 sample(s) (shape={arr.shape}); pass at least one sample per class.")
    if int(np.prod(arr.shape[1:])) == 0:
        raise ValueError(f"{name} has 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required.")
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1))
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        what = "NaN" if np.isnan(arr.reshape(-1)[first]) else "infinity"
        raise ValueError(
            f"{name} contains {what} at {_where(arr.shape, first)} ({int(bad.sum())} non-finite value(s) in "
            "all); impute or drop those values first (e.g. sklearn.impute.SimpleImputer)."
        )
    return arr


def _is_missing(value) -> bool:
    """None, pandas' NA / NaT, or a float NaN (without importing pandas)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, float) and value != value


def _where(shape: tuple[int, ...], flat: int) -> str:
    """'row r, column c' (or 'row r, position (..)' for images) of a flat index into an array of ``shape``."""
    row, rest = divmod(flat, int(np.prod(shape[1:])))
    if len(shape) == 2:
        return f"row {row}, column {rest}"
    return f"row {row}, position {tuple(int(i) for i in np.unravel_index(rest, shape[1:]))}"


#: Integer dtypes that reach the module as they are: token ids (nn.Embedding takes int64 and int32).
TOKEN_DTYPES = (np.int64, np.int32)


def takes_token_ids(module: torch.nn.Module) -> bool:
    """Whether ``module`` reads token ids: it has an ``nn.Embedding`` or ``nn.EmbeddingBag``."""
    return any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) for m in module.modules())


def input_dtype(values_dtype, module_dtype: torch.dtype, token_ids: bool = True) -> torch.dtype:
    """The dtype inputs reach the module in: int64 and int32 as they are when they are token ids
    (``token_ids``: the module has an embedding), everything else (floats, uint8 image bytes, booleans,
    integer features of a module without embeddings) in the module's floating dtype. ``values_dtype`` is
    numpy's or torch's."""
    tokens = {torch.int64: torch.int64, torch.int32: torch.int32, np.dtype(np.int64): torch.int64,
              np.dtype(np.int32): torch.int32}
    key = values_dtype if isinstance(values_dtype, torch.dtype) else np.dtype(values_dtype)
    return tokens.get(key, module_dtype) if token_ids else module_dtype


def has_token_dtype(X) -> bool:
    """Whether ``X`` (an array) is int64 or int32: token ids for a module with an embedding."""
    return np.dtype(X.dtype).type in TOKEN_DTYPES


def check_token_ids(X: np.ndarray, module: torch.nn.Module, name: str = "X") -> None:
    """Refuse token ids an embedding of ``module`` cannot look up, naming them and the vocabulary size.

    Negative ids are never valid; ids at or above ``num_embeddings`` of every
    ``nn.Embedding`` and ``nn.EmbeddingBag`` of the module are out of every
    vocabulary.
    """
    if not (has_token_dtype(X) and takes_token_ids(module)) or X.size == 0:
        return
    low, high = int(X.min()), int(X.max())
    if low < 0:
        where = np.unravel_index(int(np.argmin(X)), X.shape)
        raise ValueError(f"{name} holds the negative token id {low} (at {tuple(int(i) for i in where)}); token ids "
                         "index an embedding table and must lie in [0, vocabulary size).")
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    if sizes and high >= max(sizes):
        raise ValueError(f"{name} holds the token id {high}, but the module's embeddings have at most {max(sizes)} "
                         f"rows (ids 0 to {max(sizes) - 1}); enlarge num_embeddings or map the ids into the vocabulary.")


def scale_mismatch(X_train: np.ndarray, X_val: np.ndarray, shift_limit: float = 1.0, ratio_limit: float = 2.0) -> str | None:
    """Say so when the validation features are on a clearly different scale from the training features.

    Over the features that vary in training, the median distance between the
    validation and training means, in training standard deviations, above
    ``shift_limit``; or the median ratio of their standard deviations beyond
    ``ratio_limit`` either way. Samples of one distribution stay far inside
    both (a shift of about 0.1 and a ratio near 1 on the benchmark data).
    Typical cause: ``X_val`` passed around a Pipeline's scaler.

    Returns
    -------
    message : str or None
    """
    t = X_train.reshape(X_train.shape[0], -1).astype(np.float64)
    v = X_val.reshape(X_val.shape[0], -1).astype(np.float64)
    spread = t.std(0)
    varies = spread > 0
    if v.shape[0] < 2 or not varies.any():
        return None
    shift = float(np.median(np.abs(v.mean(0) - t.mean(0))[varies] / spread[varies]))
    ratio = float(np.median(v.std(0)[varies] / spread[varies]))
    if shift <= shift_limit and 1.0 / ratio_limit <= ratio <= ratio_limit:
        return None
    return (
        f"X_val looks differently scaled from X: over the features, the median distance between their means is "
        f"{shift:.1f} training standard deviations and the median ratio of their spreads is {ratio:.2f}. Inside a "
        "Pipeline, X_val does not pass through the earlier steps (a scaler, say): put the trusted rows inside X "
        "and mark them with validation_mask= instead."
    )


def check_labels(y, n_samples: int, name: str = "y") -> np.ndarray:
    """Return ``y`` as a 1-D numpy array of length ``n_samples``."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.array(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels of shape (n_samples,), got shape {arr.shape}.")
    if arr.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {arr.shape[0]} labels but the features have {n_samples} rows; "
            "they must have the same length."
        )
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinity; every sample needs a class label.")
    if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
        raise ValueError(
            f"{name} holds continuous values; hydraclean cleans classification labels. "
            "Pass class labels (integers or strings)."
        )
    return arr


def resolve_validation_rows(
    n_samples: int, y: np.ndarray, validation_mask, validation_fraction: float, random_state
) -> tuple[np.ndarray, bool]:
    """Boolean mask of the rows of X that form the validation set.

    Returns
    -------
    mask : ndarray of shape (n_samples,), bool
    drawn : bool
        True when the rows were drawn here (stratified ``validation_fraction``)
        rather than given by the user.
    """
    if validation_mask is not None:
        mask = np.asarray(validation_mask)
        if mask.dtype == bool:
            if mask.shape != (n_samples,):
                raise ValueError(
                    f"validation_mask is boolean with shape {mask.shape}; it must have shape ({n_samples},)."
                )
            return mask.copy(), False
        if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 1:
            raise ValueError("validation_mask must be a boolean mask of shape (n_samples,) or 1-D row indices.")
        if mask.size and (mask.min() < -n_samples or mask.max() >= n_samples):
            raise ValueError(f"validation_mask holds row indices outside [0, {n_samples}).")
        out = np.zeros(n_samples, dtype=bool)
        out[mask] = True
        return out, False
    _, classes_count = np.unique(y, return_counts=True)
    n_val = max(int(np.ceil(validation_fraction * n_samples)), classes_count.size)
    stratify = y if classes_count.min() >= 2 and n_samples - n_val >= classes_count.size else None
    _, val_idx = train_test_split(
        np.arange(n_samples), test_size=n_val, stratify=stratify, random_state=random_state
    )
    out = np.zeros(n_samples, dtype=bool)
    out[val_idx] = True
    return out, True


def is_dataset(X) -> bool:
    """Whether ``X`` is a map-style torch Dataset (indexable, with a length)."""
    return (isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.utils.data.IterableDataset)
            and hasattr(X, "__len__"))


def dataset_labels(dataset, name: str = "X") -> np.ndarray:
    """The labels of a map-style Dataset: its ``targets`` attribute, else the second item of every sample.

    ``targets`` (torchvision's ImageFolder, MNIST, CIFAR and others have it)
    costs nothing; otherwise every sample is read once, transforms included.
    ``Subset`` takes its parent's targets at its indices.
    """
    n = len(dataset)
    if isinstance(dataset, torch.utils.data.Subset):
        parent = dataset_labels(dataset.dataset, name) if hasattr(dataset.dataset, "targets") else None
        if parent is not None:
            return parent[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return check_labels(targets, n, f"{name}.targets")
    labels = []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ValueError(
                f"{name}[{i}] is not an (input, label) pair, and {name} has no targets attribute: pass the labels "
                "as y."
            )
        label = item[1]
        labels.append(label.item() if isinstance(label, torch.Tensor) else label)
    return check_labels(labels, n, f"the labels of {name}")


def select_rows(X, mask: np.ndarray):
    """``X[mask]`` in X's own container (numpy, torch, list, pandas; a torch Dataset gives a Subset)."""
    rows = np.flatnonzero(mask)
    if is_dataset(X):
        return torch.utils.data.Subset(X, rows.tolist())
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(rows, device=X.device)]
    if isinstance(X, (np.ndarray, list)) or hasattr(X, "iloc"):
        return _safe_indexing(X, rows)
    return np.asarray(X)[rows]
