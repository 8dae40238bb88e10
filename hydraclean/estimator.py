"""scikit-learn faces of HYDRA: :class:`HydraLabelCleaner` and :class:`HydraSampler`.

Both are thin: ``fit`` checks the input, then hands it to
:func:`hydraclean.contribution.fit_contributions` (training with the trajectory
recorded, hypergradients, contributions) and to :mod:`hydraclean.cleaning`
(the decision).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .checkpoint import Checkpoints, describe, digest
from .cleaning import estimate_issue_count, flag_lowest, flag_sign_clusters, memorised_flips
from .contribution import (
    Explanation,
    contributions_from_projections,
    fit_contributions,
    suggest_labels,
    top_contributors,
)
from .ghost import GhostRows
from .gradients import eval_separable, per_sample_validation_gradients
from .routes import plan_route
from .scoring import SCORES
from .batches import DatasetInputs, Inputs, first_inputs, materialize, sample_shape
from .distributed import current_shard
from .data import (
    check_features,
    check_labels,
    check_token_ids,
    dataset_labels,
    input_dtype,
    has_token_dtype,
    takes_token_ids,
    is_dataset,
    resolve_validation_rows,
    scale_mismatch,
    select_rows,
)
from .run_store import parse_bytes
from .spill import AUTO
from .training import LearningShortfallWarning, Progress, learning_shortfall, plan_trajectory, replay, step_rng

__all__ = ["HydraLabelCleaner", "HydraSampler"]

_FITTED = (
    "_criterion",
    "_train_data",
    "contribution_",
    "class_contribution_",
    "suggested_label_",
    "contribution_matrix_",
    "trajectory_loss_",
    "trajectory_proba_",
    "trajectory_logit_margin_",
    "label_quality_",
    "label_issues_",
    "support_",
    "classes_",
    "n_features_in_",
    "input_shape_",
    "module_",
    "history_",
    "validation_mask_",
    "val_feature_indices_",
    "trajectory_",
    "device_",
)


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of one fit: every row's label, the split, and codes 0..n_classes-1."""

    y_all: np.ndarray  # labels of every row of X, as given
    val_mask: np.ndarray  # rows of X that are trusted validation rows
    X_train: np.ndarray | torch.utils.data.Dataset  # a Dataset stays one: loaded batch by batch
    y_train: np.ndarray  # codes into classes
    X_val: np.ndarray
    y_val: np.ndarray  # codes into classes
    classes: np.ndarray
    input_shape: tuple  # one sample's shape


class _HydraBase(BaseEstimator):
    """Parameters, validation and ``fit`` shared by the cleaner and the sampler."""

    _validation_hint = ""

    # With scikit-learn's metadata routing enabled, the validation data are
    # requested by default: routers (Pipeline, GridSearchCV, imbalanced-learn's
    # Pipeline) pass them on without set_*_request calls.
    __metadata_request__fit = {"X_val": True, "y_val": True, "validation_mask": True}
    __metadata_request__fit_resample = {"X_val": True, "y_val": True, "validation_mask": True}

    _parameter_constraints: dict = {
        "module": [nn.Module, callable],
        "strategy": [StrOptions({"drop", "cluster"})],
        "scoring": [StrOptions(set(SCORES))],
        "drop_fraction": [Interval(Real, 0, 1, closed="both"), StrOptions({"auto"})],
        "n_val_features": [Interval(Integral, 1, None, closed="left")],
        "hessian": [StrOptions({"free", "exact"})],
        "batchnorm": [StrOptions({"constant", "exact"})],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "optimizer": [type],
        "lr": [Interval(Real, 0, None, closed="neither"), None],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left"), None],
        "lr_schedule": [StrOptions({"constant", "cosine"}), callable],
        "lr_schedule_interval": [StrOptions({"auto", "epoch", "batch"})],
        "criterion": [nn.Module, None],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "device": [str, torch.device],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "distributed": ["boolean", StrOptions({"auto"})],
        "autocast": [StrOptions({"bfloat16", "float16"}), None],
        "max_memory": [Interval(Integral, 1, None, closed="left"), str],
        "spill_dir": [StrOptions({"auto"}), str, os.PathLike, None],
        "checkpoint_dir": [str, os.PathLike, None],
        "keep_checkpoint": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        module,
        *,
        strategy: str = "drop",
        scoring: str = "memorisation_weighted",
        drop_fraction: float | str = "auto",
        n_val_features: int = 1000,
        hessian: str = "free",
        batchnorm: str = "constant",
        max_epochs: int = 10,
        batch_size: int = 64,
        optimizer: type = torch.optim.SGD,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float | None = None,
        lr_schedule="constant",
        lr_schedule_interval: str = "auto",
        criterion: nn.Module | None = None,
        validation_fraction: float = 0.1,
        device="auto",
        num_workers: int = 0,
        distributed: bool | str = "auto",
        autocast: str | None = None,
        max_memory: int | str = "1GB",
        spill_dir: str | os.PathLike | None = "auto",
        checkpoint_dir: str | os.PathLike | None = None,
        keep_checkpoint: bool = False,
        random_state=None,
        verbose: int = 0,
        **kwargs,
    ) -> None:
        self.module = module
        self.strategy = strategy
        self.scoring = scoring
        self.drop_fraction = drop_fraction
        self.n_val_features = n_val_features
        self.hessian = hessian
        self.batchnorm = batchnorm
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.lr_schedule_interval = lr_schedule_interval
        self.criterion = criterion
        self.validation_fraction = validation_fraction
        self.device = device
        self.num_workers = num_workers
        self.distributed = distributed
        self.autocast = autocast
        self.max_memory = max_memory
        self.spill_dir = spill_dir
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoint = keep_checkpoint
        self.random_state = random_state
        self.verbose = verbose
        for key, value in kwargs.items():  # checked in fit, as every parameter is
            setattr(self, key, value)

    # skorch's convention: optimizer__<name> and lr_schedule__<name> are the torch classes' arguments, and
    # parameters of the estimator for get_params, set_params, clone and GridSearchCV.
    def get_params(self, deep: bool = True) -> dict:
        params = super().get_params(deep=deep)
        params.update(self._extra_params())
        return params

    def set_params(self, **params):
        names = set(self._get_param_names())
        extra = {k: v for k, v in params.items() if k.startswith(_ROUTED) or (k not in names and "__" not in k)}
        for key, value in extra.items():
            setattr(self, key, value)
        return super().set_params(**{k: v for k, v in params.items() if k not in extra})

    def _extra_params(self) -> dict:
        """The keyword arguments beyond the signature's (fitted and private attributes excluded)."""
        names = set(self._get_param_names())
        return {k: v for k, v in vars(self).items()
                if k not in names and not k.startswith("_") and not k.endswith("_")}

    def _routed(self, prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in self._extra_params().items() if k.startswith(prefix)}

    def fit(self, X, y=None, X_val=None, y_val=None, validation_mask=None):
        """Train the module while tracking hypergradients, score and flag every sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...) or torch.utils.data.Dataset
            Training inputs, in the shape the module expects (numpy array,
            torch tensor or nested list), never modified; or a map-style
            Dataset of ``(input, label)`` pairs, loaded batch by batch in the
            recorded order (``num_workers``), random transforms reproduced
            in every pass (see :mod:`hydraclean.batches`).
        y : array-like of shape (n_samples,), optional
            Observed, possibly noisy, class labels (integers or strings).
            Required for arrays; for a Dataset, its ``targets`` attribute or
            the labels it yields are used when ``y`` is None.
        X_val, y_val : array-like or Dataset, optional
            A trusted (clean) validation set, with X's trailing shape and
            labels seen in ``y``. A Dataset is read into memory once (give it
            evaluation transforms); ``y_val`` then defaults to its labels.
        validation_mask : array-like of bool of shape (n_samples,) or of int, optional
            Rows of ``X`` that form the trusted validation set instead (useful
            inside a Pipeline, whose earlier steps do not transform ``X_val``).
            Those rows are not trained on and are never flagged.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        self._validate_params()
        _check_routed(type(self).__name__, self._extra_params())
        fitted = self._fit(X, y, X_val, y_val, validation_mask)
        for name in _FITTED:
            setattr(self, name, fitted[name])
        return self

    def fit_resample(self, X, y=None, X_val=None, y_val=None, validation_mask=None):
        """Fit, then return ``(X[support_], y[support_])``.

        Parameters
        ----------
        X, y, X_val, y_val, validation_mask
            As in :meth:`fit`.

        Returns
        -------
        X_resampled : same container as X, shape (n_kept, ...)
            A ``Subset`` for a Dataset.
        y_resampled : same container as y, shape (n_kept,)
            For a Dataset without ``y``: its labels as an array.
        """
        support = self.fit(X, y, X_val=X_val, y_val=y_val, validation_mask=validation_mask).support_
        labels = y if y is not None or not is_dataset(X) else dataset_labels(X)
        return select_rows(X, support), select_rows(labels, support)

    def explain(self, X_val, y_val=None, k: int = 10) -> Explanation:
        """The training samples that helped and hurt each given validation sample most.

        Replays the recorded training run once (the same steps from the
        recorded ``w_0``: bit for bit on CPU) and projects its Hessian-free
        hypergradients, whatever ``hessian`` was, to get ``C(i, j)`` for every
        training row ``i`` and every given sample ``j``: about the cost of a
        ``strategy="cluster"`` fit with as many validation features.

        Parameters
        ----------
        X_val : array-like of shape (n_explained, ...) or torch.utils.data.Dataset
            Samples to explain, shaped as ``X`` (a Dataset is read into memory).
        y_val : array-like of shape (n_explained,)
            Their labels (the loss whose change is attributed), from
            ``classes_``; for a Dataset, its labels when None.
        k : int, default=10
            Samples listed on each side.

        Returns
        -------
        Explanation
            ``helpful`` and ``harmful`` hold row indices into the ``X`` given
            to :meth:`fit`, shape (n_explained, k), with their ``C(i, j)``.
        """
        check_is_fitted(self)
        if is_dataset(X_val):
            y_val = dataset_labels(X_val, "X_val") if y_val is None else y_val
            X_val = materialize(X_val).numpy()
        elif y_val is None:
            raise ValueError("y_val is required: the labels of the samples to explain.")
        Xv = check_features(X_val, "X_val")
        yv = check_labels(y_val, Xv.shape[0], "y_val")
        if Xv.shape[1:] != self.input_shape_:
            raise ValueError(f"X_val has trailing shape {Xv.shape[1:]} but the cleaner was fitted on {self.input_shape_}.")
        unseen = np.setdiff1d(np.unique(yv), self.classes_)
        if unseen.size:
            raise ValueError(f"y_val holds labels {unseen.tolist()[:10]} that are not in classes_.")
        if not (isinstance(k, Integral) and k >= 1):
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        device = self.device_ if self.device_.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")
        dtype = _floating_dtype(self.module_)
        ids = takes_token_ids(self.module_)
        X_tr = self._training_inputs(self._train_data[0], device, dtype, ids)
        y_tr = self._train_data[1].to(device)
        Xv_t = torch.as_tensor(Xv, dtype=input_dtype(Xv.dtype, dtype, ids), device=device)
        yv_t = torch.as_tensor(np.searchsorted(self.classes_, yv), device=device)
        model = self.module_.to(device)
        G = per_sample_validation_gradients(model, Xv_t, yv_t, self._criterion, torch.arange(len(yv), device=device))
        # module_ supplies the architecture; the replay starts from the recorded w_0
        trajectory = replace(self.trajectory_, shard=current_shard(self.distributed))
        route = plan_route(model, self._criterion, X_tr, y_tr, trajectory, max_memory=parse_bytes(self.max_memory),
                           spill_dir=self.spill_dir, batchnorm=self.batchnorm)
        try:
            with self._progress() as progress:
                replay(trajectory, model, X_tr, y_tr, self._criterion, route, progress=progress)
                route.finish()
                ghost = GhostRows(model, Xv_t, yv_t, torch.eye(len(yv), dtype=G.dtype, device=device)) if \
                    eval_separable(model) else None
                P = route.project(G, ghost, progress)
        finally:
            route.close()
        if trajectory.shard is not None:
            trajectory.shard.all_reduce(P)
            trajectory.shard.finish()
        C = np.full((self.validation_mask_.size, len(yv)), np.nan)
        C[~self.validation_mask_] = contributions_from_projections(P, len(y_tr)).double().cpu().numpy()
        return top_contributors(C, k)

    def __getstate__(self):
        # Fitted tensors are pickled on the CPU so that a cleaner fitted on a GPU
        # loads on a machine without one; __setstate__ moves them back when it can.
        state = dict(super().__getstate__())  # object.__getstate__ returns the live __dict__
        if isinstance(state.get("module_"), nn.Module):
            state["module_"] = copy.deepcopy(state["module_"]).cpu()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        device = state.get("device_")
        if isinstance(state.get("module_"), nn.Module) and device is not None and device.type == "cuda":
            if torch.cuda.is_available():
                self.module_ = self.module_.to(device)

    # -- the steps of fit -------------------------------------------------------

    def _fit(self, X, y, X_val, y_val, validation_mask) -> dict:
        # One child seed per use, drawn up front: the same random_state gives the same
        # split, initialisation and training run whatever the strategy.
        split_seed, init_seed, train_seed, feature_seed = check_random_state(self.random_state).randint(
            np.iinfo(np.int32).max, size=4
        )
        data = self._resolve_inputs(X, y, X_val, y_val, validation_mask, split_seed)
        result, run = self._run(data, int(init_seed), int(train_seed), int(feature_seed))
        return self._decide(data, result, run, int(feature_seed))

    def _resolve_inputs(self, X, y, X_val, y_val, validation_mask, split_seed) -> _Inputs:
        """Checked arrays: the training rows, the trusted validation rows and the label codes.

        A Dataset ``X`` stays a Dataset (its training rows a ``Subset``); only
        the validation rows are read into an array.
        """
        dataset = is_dataset(X)
        if y is None and not dataset:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None: pass the "
                             "observed labels of X (only a torch Dataset carries its own).")
        X_all = X if dataset else check_features(X)
        n_all = len(X_all)
        y_all = check_labels(y, n_all) if y is not None else dataset_labels(X)
        if n_all < 2:
            raise ValueError(
                f"Found n_samples={n_all}: cleaning needs at least 2 samples of at least 2 classes."
            )
        shape = sample_shape(X_all) if dataset else X_all.shape[1:]  # one sample's
        if dataset and X_val is not None and y_val is None and is_dataset(X_val):
            y_val = dataset_labels(X_val, "X_val")
        if (X_val is None) != (y_val is None):
            raise ValueError("Pass X_val and y_val together, or neither.")
        if X_val is not None and validation_mask is not None:
            raise ValueError("Pass either X_val/y_val or validation_mask, not both.")
        if X_val is None:
            val_mask, drawn = resolve_validation_rows(
                n_all, y_all, validation_mask, self.validation_fraction, split_seed
            )
            if drawn:
                warnings.warn(
                    f"No trusted validation set given: {val_mask.sum()} rows "
                    f"(validation_fraction={self.validation_fraction}) were held out of the "
                    "training data. Noisy validation labels weaken the scores; pass a clean "
                    "X_val, y_val (or validation_mask) when you have one." + self._validation_hint,
                    UserWarning,
                    stacklevel=4,
                )
            y_tr, y_v = y_all[~val_mask], y_all[val_mask]
            if dataset:  # the validation rows drawn from X are read once, under seed 0
                X_tr, X_v = select_rows(X_all, ~val_mask), materialize(X_all, np.flatnonzero(val_mask)).numpy()
            else:
                X_tr, X_v = X_all[~val_mask], X_all[val_mask]
        else:
            val_mask = np.zeros(n_all, dtype=bool)
            X_tr, y_tr = X_all, y_all
            X_v = check_features(materialize(X_val).numpy() if is_dataset(X_val) else X_val, "X_val")
            y_v = check_labels(y_val, X_v.shape[0], "y_val")
            if X_v.shape[1:] != shape:
                raise ValueError(
                    f"X_val has trailing shape {X_v.shape[1:]} but X has {tuple(shape)}; "
                    "both must be shaped as the module expects."
                )
            # integer arrays: token ids, whose scale means nothing
            mismatch = None if dataset or has_token_dtype(X_tr) else scale_mismatch(X_tr, X_v)
            if mismatch:
                warnings.warn(mismatch, UserWarning, stacklevel=4)
        if len(y_tr) == 0:
            raise ValueError("No training rows are left once the validation rows are set aside.")
        classes, y_tr_enc = np.unique(y_tr, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                f"y has {classes.size} class among the training rows; cleaning labels needs at least 2."
            )
        unseen = np.setdiff1d(np.unique(y_v), classes)
        if unseen.size:
            raise ValueError(
                f"The validation labels {unseen.tolist()[:10]} do not occur in the training labels "
                f"{classes.tolist()[:10]}; every validation class must be seen in training."
            )
        return _Inputs(y_all, val_mask, X_tr, y_tr_enc, X_v, np.searchsorted(classes, y_v), classes, shape)

    def _run(self, data: _Inputs, init_seed: int, train_seed: int, feature_seed: int):
        """Train with the trajectory recorded and compute the contributions (hydraclean.contribution)."""
        device = self._resolve_device()
        max_memory = parse_bytes(self.max_memory)
        if self.spill_dir not in (None, AUTO) and not os.path.isdir(self.spill_dir):
            raise ValueError(f"spill_dir={self.spill_dir!r} is not a directory. Create it, or pass spill_dir='auto' "
                             "(the temporary directory where it has room) or None.")
        module = self._build_module(data.input_shape, data.classes.size, device, init_seed)
        dtype = _floating_dtype(module)
        if self.autocast is not None and self.hessian == "exact":
            raise ValueError("autocast applies to hessian='free' only: the exact mode is the reference computation, "
                             "in the module's own dtype. Pass autocast=None or hessian='free'.")
        if self.autocast is not None and dtype != torch.float32:
            raise ValueError(f"autocast={self.autocast!r} needs a float32 module; this one is {dtype}. Pass "
                             "autocast=None, or a float32 module.")
        shard = current_shard(self.distributed)  # hessian='exact' in a data-parallel run: fit_contributions refuses
        if shard is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise ValueError(
                "A data-parallel fit splits each batch across ranks, and BatchNorm would normalise each share with "
                "its own statistics: the run would not be the single-process one. Pass distributed=False."
            )
        criterion = self._resolve_criterion()
        to = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        if not is_dataset(data.X_train):
            check_token_ids(data.X_train, module)
        check_token_ids(data.X_val, module, "X_val")
        ids = takes_token_ids(module)
        Xt = self._training_inputs(data.X_train, device, dtype, ids)
        Xv = to(data.X_val, input_dtype(data.X_val.dtype, dtype, ids))
        yt, yv = to(data.y_train, torch.long), to(data.y_val, torch.long)
        _check_forward(module, first_inputs(Xt, 2), data.classes.size)
        _check_batch_norm_batches(module, len(yt), self.batch_size)

        val_rows = None
        if self.strategy == "cluster":
            m = min(self.n_val_features, Xv.shape[0])
            val_rows = np.sort(np.random.RandomState(feature_seed).choice(Xv.shape[0], size=m, replace=False))
        trajectory = plan_trajectory(
            len(yt),
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            seed=train_seed,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_schedule=self.lr_schedule,
            optimizer_options=self._routed("optimizer__"),
            schedule_options=self._routed("lr_schedule__"),
            schedule_interval=self.lr_schedule_interval,
            autocast=None if self.autocast is None else getattr(torch, self.autocast),
            shard=shard,
        )
        needs = self._needs()
        checkpoint = None
        if self.checkpoint_dir is not None:
            if shard is not None:
                raise ValueError("checkpoint_dir is not supported in a data-parallel fit yet: pass distributed=False, "
                                 "or checkpoint_dir=None.")
            checkpoint = Checkpoints(self.checkpoint_dir, self._fingerprint(data, module))
        with self._progress() as progress:
            result = fit_contributions(
                module,
                Xt,
                yt,
                Xv,
                yv,
                criterion=criterion,
                trajectory=trajectory,
                n_classes=data.classes.size,
                hessian=self.hessian,
                contributions=bool(needs - {"trajectory"}),
                classes="class_contribution" in needs,
                val_rows=None if val_rows is None else torch.as_tensor(val_rows, device=device),
                progress=progress,
                max_memory=max_memory,
                spill_dir=self.spill_dir,
                checkpoint=checkpoint,
                batchnorm=self.batchnorm,
            )
        if checkpoint is not None and not self.keep_checkpoint:
            checkpoint.clear()
        run = {"device_": device, "val_feature_indices_": val_rows, "_criterion": criterion,
               "_train_data": (data.X_train if isinstance(Xt, DatasetInputs) else Xt.cpu(), yt.cpu())}
        return result, run

    def _decide(self, data: _Inputs, result, run: dict, feature_seed: int) -> dict:
        """Score every training row with ``scoring`` and flag with ``strategy`` (hydraclean.cleaning)."""
        n_all = data.val_mask.size
        train_rows = np.flatnonzero(~data.val_mask)
        shortfall = learning_shortfall(result.history, data.y_val)
        if shortfall:
            warnings.warn(shortfall, LearningShortfallWarning, stacklevel=4)

        def per_row(values: np.ndarray | None) -> np.ndarray | None:
            """Training-row values laid out over the rows of X, NaN for validation rows."""
            if values is None:
                return None
            out = np.full((n_all, *values.shape[1:]), np.nan)
            out[train_rows] = values
            return out

        quality = SCORES[self.scoring](
            contribution=result.contribution,
            class_contribution=result.class_contribution,
            labels=data.y_train,
            trajectory_loss=result.trajectory_loss,
            trajectory_proba=result.trajectory_proba,
            trajectory_logit_margin=result.trajectory_logit_margin,
            train_accuracy=result.history["train_accuracy"][-1],
        )
        issues = np.zeros(n_all, dtype=bool)
        if self.strategy == "drop" and self.drop_fraction == "auto":
            count = estimate_issue_count(result.class_contribution, result.trajectory_proba, data.y_train,
                                         memorised=memorised_flips(result.trajectory_proba, data.y_train,
                                                                   result.history["train_accuracy"][-1],
                                                                   result.history["valid_accuracy"],
                                                                   len(data.y_val)))
            issues[train_rows] = flag_lowest(quality, count=count)
        elif self.strategy == "drop":
            issues[train_rows] = flag_lowest(quality, self.drop_fraction)
        else:
            issues[train_rows] = flag_sign_clusters(
                result.contribution_matrix, data.y_train, quality, random_state=feature_seed
            )
        class_contribution = per_row(result.class_contribution)
        return {
            **run,
            "contribution_": per_row(result.contribution),
            "class_contribution_": class_contribution,
            "suggested_label_": None if class_contribution is None else suggest_labels(class_contribution,
                                                                                        data.classes, data.y_all),
            "contribution_matrix_": per_row(result.contribution_matrix),
            "trajectory_loss_": per_row(result.trajectory_loss),
            "trajectory_proba_": per_row(result.trajectory_proba),
            "trajectory_logit_margin_": per_row(result.trajectory_logit_margin),
            "label_quality_": per_row(quality),
            "label_issues_": issues,
            "support_": ~issues,
            "classes_": data.classes,
            "n_features_in_": int(np.prod(data.input_shape)),
            "input_shape_": tuple(data.input_shape),
            "module_": result.model.eval(),
            "history_": result.history,
            "validation_mask_": data.val_mask,
            "trajectory_": result.trajectory,
        }

    def _training_inputs(self, X, device: torch.device, dtype: torch.dtype, token_ids: bool) -> Inputs:
        """The training inputs on ``device``: one tensor, or a Dataset's loader (pinned memory for a GPU)."""
        if is_dataset(X):
            return DatasetInputs(X, device, dtype, num_workers=self.num_workers, pin_memory=device.type == "cuda",
                                 token_ids=token_ids)
        return torch.as_tensor(X, dtype=input_dtype(X.dtype, dtype, token_ids), device=device)

    def _resolve_device(self) -> torch.device:
        if isinstance(self.device, str) and self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={self.device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'.") from exc
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for a CUDA-less build
            raise ValueError(
                f"device={self.device!r} is not available here; available: {', '.join(_available_devices())}. "
                "Use device='auto' to take a GPU when there is one."
            ) from exc
        return device

    def _build_module(self, input_shape, n_classes: int, device: torch.device, seed: int) -> nn.Module:
        if isinstance(self.module, nn.Module):
            module = copy.deepcopy(self.module)
        else:
            offered = {"n_features": int(np.prod(input_shape)), "n_classes": n_classes, "input_shape": input_shape}
            accepted = inspect.signature(self.module).parameters
            kwargs = {k: v for k, v in offered.items() if k in accepted}
            with step_rng(int(seed), torch.device("cpu")):
                module = self.module(**kwargs)
            if not isinstance(module, nn.Module):
                raise TypeError(f"module() returned {type(module).__name__}; it must return a torch.nn.Module.")
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError("The module has no trainable parameters; HYDRA needs parameters to train.")
        return module.to(device)

    def _resolve_criterion(self) -> nn.Module:
        if self.criterion is None:
            return nn.CrossEntropyLoss(reduction="none")
        if getattr(self.criterion, "reduction", "none") != "none":
            raise ValueError(
                f"criterion has reduction={self.criterion.reduction!r}; HYDRA needs per-sample "
                "losses: construct it with reduction='none'."
            )
        return self.criterion

    def _fingerprint(self, data: _Inputs, module: nn.Module) -> dict[str, str]:
        """What a checkpoint of this fit depends on: the data, the initial module and every parameter that
        changes the run (progress bars, workers and where checkpoints go do not)."""
        ignored = {"verbose", "num_workers", "checkpoint_dir", "keep_checkpoint", "spill_dir"}
        X = data.X_train
        inputs = (f"{type(X).__qualname__} of {len(X)}: " + digest(materialize(X, [0, len(X) // 2, len(X) - 1]))
                  if is_dataset(X) else digest(X))  # a Dataset: its length and three items
        parts = {"X": inputs, "y": digest(data.y_train, data.classes), "validation": digest(data.X_val, data.y_val),
                 "module": describe(module), "device": str(next(module.parameters()).device),
                 "torch": str(torch.__version__)}
        parts.update({f"parameter {k}": describe(v) for k, v in self.get_params(deep=False).items()
                      if k not in ignored and k != "module"})
        return parts

    def _needs(self) -> frozenset[str]:
        """What this fit must compute: the score's inputs, and the class-resolved contributions for the
        automatic count; ``"contribution"`` or ``"class_contribution"`` cost a hypergradient."""
        needs = set(SCORES[self.scoring].needs)
        if self.strategy == "drop" and self.drop_fraction == "auto":
            needs.add("class_contribution")
        if self.strategy == "cluster":
            needs.add("contribution")
        return frozenset(needs)

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Progress | None]:
        """With ``verbose``: tqdm bars for the run's loops, each closed when the run ends, however it ends (so an
        interrupted fit leaves no half-drawn bar in front of what is printed next)."""
        if not self.verbose:
            yield None
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars are an optional extra
            warnings.warn("verbose > 0 shows progress bars with tqdm, which is not installed: pip install tqdm.",
                          stacklevel=5)
            yield None
            return
        bars = []

        def progress(it, desc, total):
            bars.append(tqdm(it, desc=desc, total=total, unit="step", leave=False))
            return bars[-1]

        try:
            yield progress
        finally:
            for bar in bars:
                bar.close()


def _available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return devices + (["mps"] if mps is not None and mps.is_available() else [])


#: Prefixes of the keyword arguments that reach the torch classes (skorch's convention).
_ROUTED = ("optimizer__", "lr_schedule__")


def _check_routed(owner: str, kwargs: dict) -> None:
    """Only ``optimizer__<name>`` and ``lr_schedule__<name>`` keywords: anything else is a typo."""
    for key in kwargs:
        if not key.startswith(_ROUTED) or key in _ROUTED:
            raise TypeError(
                f"{owner} got an unexpected keyword argument {key!r}; besides its parameters it takes "
                "optimizer__<name> (an argument of the optimizer class) and lr_schedule__<name> (of a torch "
                "scheduler class)."
            )


def _check_batch_norm_batches(module: nn.Module, n_train: int, batch_size: int) -> None:
    """BatchNorm cannot train on a batch of one sample: say so, with a batch size that works."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return
    sizes = {min(batch_size, n_train)} | ({n_train % batch_size} if n_train % batch_size else set())
    if 1 in sizes:
        better = next((b for b in range(max(batch_size, 2), n_train + 1) if n_train % b != 1), None)
        fix = f"Use batch_size={better}, or drop or add a training row." if better else "Add training rows."
        raise ValueError(
            f"The module has BatchNorm layers and a training batch of 1 sample would occur (n_train={n_train}, "
            f"batch_size={batch_size}); BatchNorm needs at least 2 samples per batch in training. {fix}"
        )


def _floating_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    raise TypeError("The module has no floating-point parameters to train.")


def _check_forward(module: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    """One forward pass in eval mode before training, to fail early and clearly."""
    probe = copy.deepcopy(module).eval()
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as exc:
        raise ValueError(
            f"The module's forward pass failed on an input batch of shape {tuple(x.shape)} and dtype {x.dtype} "
            f"({type(exc).__name__}: {exc}). Check that X is shaped as the module expects (int64 and int32 inputs "
            "reach a module with an nn.Embedding or nn.EmbeddingBag as token ids; every other input, and every "
            "input of a module without one, in the module's floating dtype)."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != n_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The module outputs {shape} for a batch of {x.shape[0]}, but y has {n_classes} classes; "
            f"its output must be logits of shape (batch, {n_classes})."
        )


class HydraLabelCleaner(TransformerMixin, _HydraBase):
    """Find and remove mislabelled training samples with HYDRA.

    ``fit`` trains a copy of a torch module (SGD, Adam or AdamW) while
    recording its trajectory, follows the hypergradient of the parameters
    with respect to every training sample's weight through all steps, and
    scores each sample by its contribution to a trusted validation set's
    loss (positive helps, negative hurts): overall (``contribution_``, the
    paper's C(i)) and per validation class (``class_contribution_``). The
    training run also records how it treated each sample (its loss and
    softmax output, averaged over the epochs). ``scoring`` turns these into
    one label-quality score, ``label_quality_``; the lowest are flagged.

    The default score, ``"memorisation_weighted"``, mixes robust z-scores of
    the sample's margins along the run (softmax and logit) and of the harm it
    did to the validation class it hurts most, by how far the model memorised
    its labels; ``docs/benchmarks.md`` compares it with the paper's C(i),
    cleanlab, AUM and the other peers on every benchmark setting.
    ``scoring="contribution"`` with a float ``drop_fraction`` is the paper's
    HYDRA.

    .. note::
       ``fit_transform(X, y)`` returns ``X[support_]``, the cleaned training
       data, whereas ``transform(X)`` returns ``X`` unchanged: cleaning is a
       training-time act (as for imbalanced-learn's samplers), so
       ``fit_transform`` is deliberately not ``fit().transform()``.

    Parameters
    ----------
    module : torch.nn.Module or callable
        The classifier; outputs logits of shape (batch, n_classes). Its
        current weights are ``w_0``; it is never modified (fit trains a copy,
        ``module_``). A callable is called with whichever of ``n_features``,
        ``n_classes`` and ``input_shape`` it accepts and must return a module;
        it is initialised under ``random_state``. Training runs in the dtype
        of the module's parameters.
    strategy : {"drop", "cluster"}, default="drop"
        ``"drop"`` flags the samples with the lowest ``label_quality_``, as
        many as ``drop_fraction`` says. ``"cluster"`` clusters, per class,
        the sign vectors of ``C(i, j)`` over ``n_val_features`` validation
        samples in two and flags the group with the lower mean
        ``label_quality_`` (the paper's rule with ``scoring="contribution"``).
    scoring : str, default="memorisation_weighted"
        The label-quality score (higher = more likely correct), one of
        :data:`hydraclean.scoring.SCORES`: ``"memorisation_weighted"``,
        ``"combined"`` (three z-scores added with equal weight),
        ``"contribution"`` (the paper's C(i)), ``"class_min"`` (``min_c
        C(i, c)``), ``"class_harm"`` (the same with each class's column
        scaled by its spread), ``"trajectory_loss"``,
        ``"trajectory_margin"`` and ``"aum"`` (the averaged logit margin;
        these three need no hypergradient: the training run's record of the
        sample). All come from the same fit.
    drop_fraction : float in [0, 1] or "auto", default="auto"
        Fraction of training samples flagged by ``strategy="drop"``. With
        ``"auto"``, the number is estimated without knowing the noise rate
        (:func:`hydraclean.cleaning.estimate_issue_count`): the samples that
        the model, averaged over the run, predicted as another class, plus,
        where the run memorised labels and the validation accuracy fell for
        it, the samples that hurt some validation class more than that
        class's own samples typically help it (as far as the run memorised).
        The lowest-scored that many are flagged.
    n_val_features : int, default=1000
        Validation samples drawn (with ``random_state``) as features for
        ``strategy="cluster"``.
    hessian : {"free", "exact"}, default="free"
        ``"free"``: HYDRA's fast approximation, which drops the loss Hessian
        from the hypergradient and keeps every derivative of the optimizer's
        update; scored from what the training steps kept (layer factors or
        gradients, within ``max_memory``), nothing of size ``N x n_params``.
        ``"exact"``: keeps the Hessian term, for every sample, by one
        reverse-mode sweep over the stored run: about one Hessian-vector
        product per step and projected direction (one for
        ``scoring="contribution"``, one per class for the class-resolved
        scores).
    batchnorm : {"constant", "exact"}, default="constant"
        Only for a module with a BatchNorm that normalises with its batch's
        statistics in training (train mode): with ``hessian="free"``, each
        sample's gradient either holds those statistics constant
        (``"constant"``: the layer-factor route, about the cost of a model
        without BatchNorm) or keeps their dependence on the weights
        (``"exact"``: the definition of DESIGN.md section 1, one forward-mode
        JVP per direction and step). The default score ranks alike on both;
        the contributions themselves differ (on the benchmark's BatchNorm
        ResNets the constant route's ``C(i)`` alone ranks at chance), so take
        ``"exact"`` for ``scoring="contribution"``, ``strategy="cluster"``
        and :meth:`explain`. The user guide gives the measured difference.
    max_epochs : int, default=10
    batch_size : int, default=64
        The last batch of an epoch keeps the remainder.
    optimizer : {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW}, default=torch.optim.SGD
        The optimizer class; the training run is exactly its step
        (:mod:`hydraclean.optimizers`). Its other arguments are set as
        ``optimizer__<name>`` (skorch's convention), e.g.
        ``optimizer__betas=(0.9, 0.99)``, ``optimizer__eps``,
        ``optimizer__amsgrad``, ``optimizer__nesterov``,
        ``optimizer__dampening``. Others are refused: the hypergradient
        follows the update rule, and hydraclean has the rule of these three.
    lr : float, default=None
        Base learning rate, as torch means it for ``optimizer``. None: 0.01
        for SGD, torch's default (1e-3) for Adam and AdamW.
    momentum : float in [0, 1), default=0.9
        SGD's momentum; only used when ``optimizer`` is SGD (Adam's
        ``beta1`` is the first of ``optimizer__betas``).
    weight_decay : float, default=None
        As torch means it for ``optimizer``: L2 added to the gradient (SGD,
        Adam), or decoupled, ``w *= 1 - lr * weight_decay`` (AdamW). None: 0
        for SGD and Adam, torch's 1e-2 for AdamW.
    lr_schedule : str, torch scheduler class or callable, default="constant"
        ``"constant"``, ``"cosine"`` (annealed to 0 over the run, every
        batch), a ``torch.optim.lr_scheduler`` class (or a
        ``functools.partial`` of one) with its arguments as
        ``lr_schedule__<name>``, a one-argument callable (``LambdaLR``'s
        ``lr_lambda``), or a callable ``schedule(epoch, step) -> factor``
        multiplying ``lr`` such as :class:`hydraclean.schedules.ExponentialDecay`.
        The library supplies the run's length (``T_max``, ``total_steps``)
        where the class needs it; every step's values, momentum or
        ``beta1`` included (OneCycleLR), are resolved before training (see
        the user guide's "Training recipes").
    lr_schedule_interval : {"auto", "epoch", "batch"}, default="auto"
        When a torch scheduler is stepped: after every epoch or every batch.
        "auto": every batch for OneCycleLR, CyclicLR and ``"cosine"``, every
        epoch otherwise, as torch's documentation does.
    criterion : torch.nn.Module, default=None
        Per-sample loss with ``reduction="none"``; cross-entropy when None.
    validation_fraction : float in (0, 1), default=0.1
        Used only without ``X_val`` and ``validation_mask``: the stratified
        fraction of ``X`` held out as the validation set (with a warning).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        "auto" trains on a GPU when there is one.
    num_workers : int, default=0
        ``DataLoader`` worker processes that load a Dataset ``X`` (0: in
        the main process). Arrays ignore it.
    distributed : bool or "auto", default="auto"
        Data-parallel fit on ``torch.distributed``: with "auto", when a
        default process group of several ranks is initialised (a script
        launched with ``torchrun``), every rank takes its share of each
        global batch (``batch_size`` stays the global batch), gradients are
        all-reduced so that every update is the single-process one, each rank
        scores its share and every rank ends with the same fitted
        attributes. Call ``fit`` on every rank. False fits in each process
        alone. See the "Large data" page of the documentation.
    autocast : {"bfloat16", "float16"} or None, default=None
        Run the training steps' forward passes and losses under
        ``torch.autocast`` to this dtype (mixed precision, mainly for GPUs).
        Weights, gradients, updates, validation gradients and the
        contributions stay in the module's float32. No gradient scaling, so
        "float16" can underflow small gradients; prefer "bfloat16" where the
        device has it. Only with ``hessian="free"``; the effect on the
        contributions is measured in docs/benchmarks.md.
    max_memory : int or str, default="1GB"
        Bytes (or a string such as ``"512MB"``, ``"2GiB"``) on ``device`` for
        what scoring keeps from the training run, so that it never re-runs
        the optimizer: the layer factors of every step when the module's
        layers have them (user guide, "Architectures") and they fit; else,
        under SGD, each step's layer inputs and output gradients as the
        training steps caught them; else every step's gradient. When those do
        not fit either, checkpoints every few steps are kept and scoring
        recomputes the steps between them (about one more training run), or,
        as ``spill_dir`` allows, they go to disk.
    spill_dir : "auto", str, path-like or None, default="auto"
        Directory for temporary files of what scoring keeps from the run when
        it does not fit in ``max_memory``: under SGD, each step's layer inputs
        and output gradients (one file a step), else a memory-mapped file of
        the run's gradients; deleted after scoring, also when the fit fails.
        It spares scoring the recomputation from checkpoints (about one more
        training run) at the price of disk, which grows with samples x epochs
        (ResNet-18 on 2,000 images for 3 epochs: 2.2 GB; the user guide's
        "Architectures" measures both routes). "auto": the temporary directory
        (``tempfile.gettempdir()``, ``$TMPDIR``) when it is on disk (not
        tmpfs) and what would go there takes at most half of its free space;
        otherwise checkpoints, with a warning that says why. A directory given
        by name without room for it is refused before training. None: always
        checkpoints, nothing written to disk.
    checkpoint_dir : str or path-like, default=None
        Folder where the fit saves everything needed to continue, at the end
        of every epoch, when interrupted (Ctrl-C finishes the step under way,
        saves, and raises ``KeyboardInterrupt``; the estimator is left as it
        was) and when training is over. ``fit`` with the same data and
        parameters continues from the last saved point, with the results of
        an uninterrupted fit (bit for bit on CPU); a checkpoint from other
        data or parameters is refused. See the user guide's "Long runs".
    keep_checkpoint : bool, default=False
        Keep the checkpoint after a successful fit (by default it is
        removed); a later ``fit`` with the same data and parameters then only
        scores.
    random_state : int, RandomState instance or None, default=None
        Seeds the batch order, dropout masks, a callable module's
        initialisation, the validation split, validation features and
        k-means. On CPU, equal seeds give bit-identical results.
    verbose : int, default=0
        Progress bars (tqdm) when > 0: one over the training steps and, where
        scoring walks the run again, one over the scoring steps, with rate
        and ETA.
    **kwargs
        ``optimizer__<name>`` and ``lr_schedule__<name>``: arguments of the
        optimizer and scheduler classes, parameters of the estimator like
        the others (``get_params``, ``set_params``, ``clone``, grid searches).

    Attributes
    ----------
    contribution_ : ndarray of shape (n_samples,) or None
        ``C(i) = -(1/N) <grad L_val(w_T), d w_T / d eps_i>``, one entry per
        row of ``X``; NaN for validation rows. None when the score needs no
        hypergradient (``scoring="trajectory_loss"``, ``"trajectory_margin"``
        or ``"aum"`` with a float ``drop_fraction``).
    class_contribution_ : ndarray of shape (n_samples, n_classes) or None
        ``C(i, c) = -(1/N) <grad L_val^c(w_T), d w_T / d eps_i>``, with
        ``L_val^c`` the mean validation loss over class ``classes_[c]``; a
        class without validation samples has a NaN column. From the same
        projection as ``contribution_``, which is its average weighted by the
        validation class frequencies. None when nothing in the fit needs it
        (``scoring="contribution"`` or a trajectory score with a float
        ``drop_fraction``): one direction instead of one per class.
    suggested_label_ : ndarray of shape (n_samples,) or None
        ``classes_[argmin_c C(i, c)]``: the class whose validation loss the
        sample raises most, its likely true class when it is mislabelled
        (for a correct one, the class it competes with most). Validation rows
        keep their given label. None without ``class_contribution_``.
    trajectory_loss_ : ndarray of shape (n_samples,)
        Each sample's training loss averaged over the epochs, as the
        training steps computed it; NaN for validation rows.
    trajectory_proba_ : ndarray of shape (n_samples, n_classes)
        Each sample's softmax output averaged over the epochs, likewise.
    trajectory_logit_margin_ : ndarray of shape (n_samples,)
        Each sample's logit margin (its label's logit minus the largest other
        logit) averaged over the epochs, likewise: the area under the margin
        (AUM) of Pleiss et al. (2020).
    contribution_matrix_ : ndarray of shape (n_samples, n_val_features) or None
        ``C(i, j)`` against the validation samples ``val_feature_indices_``
        (``strategy="cluster"`` only).
    label_quality_ : ndarray of shape (n_samples,)
        The ``scoring`` score that the strategies rank by: higher = more
        likely correctly labelled; NaN for validation rows.
    label_issues_ : ndarray of shape (n_samples,), bool
        Flagged rows.
    support_ : ndarray of shape (n_samples,), bool
        ``~label_issues_``: the rows kept.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
        Number of input values per sample (product of the trailing shape).
    input_shape_ : tuple of int
        Trailing shape of ``X``.
    module_ : torch.nn.Module
        The trained copy, in eval mode.
    history_ : dict of str to list of float
        Per-epoch ``train_loss``, ``train_accuracy``, ``valid_loss``,
        ``valid_accuracy``.
    validation_mask_ : ndarray of shape (n_samples,), bool
        Rows of ``X`` used as the validation set (all False with ``X_val``).
    val_feature_indices_ : ndarray of int or None
        Validation samples used as the columns of ``contribution_matrix_``.
    trajectory_ : hydraclean.training.Trajectory
        The recorded training run (replayable).
    device_ : torch.device

    See Also
    --------
    HydraSampler : The same cleaner as an imbalanced-learn sampler.

    References
    ----------
    Y. Chen, B. Li, H. Yu, P. Wu, C. Miao. "HYDRA: Hypergradient Data
    Relevance Analysis for Interpreting Deep Neural Networks." AAAI 2021.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from hydraclean import HydraLabelCleaner
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4)).astype("float32"); y = (X[:, 0] > 0).astype(int)
    >>> cleaner = HydraLabelCleaner(torch.nn.Linear(4, 2), drop_fraction=0.1,
    ...                             max_epochs=2, batch_size=16, random_state=0)
    >>> X_clean = cleaner.fit_transform(X, y, X_val=X[:20], y_val=y[:20])
    >>> X_clean.shape
    (54, 4)
    """

    def fit_transform(self, X, y=None, X_val=None, y_val=None, validation_mask=None):
        """Fit, then return the kept rows ``X[support_]``.

        Parameters
        ----------
        X, y, X_val, y_val, validation_mask
            As in :meth:`fit`.

        Returns
        -------
        X_clean : same container as X, shape (n_kept, ...)
            A ``Subset`` for a Dataset.
        """
        fitted = self.fit(X, y, X_val=X_val, y_val=y_val, validation_mask=validation_mask)
        return select_rows(X, fitted.support_)

    def transform(self, X):
        """Return ``X`` unchanged (after checking it): cleaning happens at training time only.

        Parameters
        ----------
        X : array-like

        Returns
        -------
        X : the same object
        """
        check_is_fitted(self)
        if is_dataset(X):
            return X
        arr = check_features(X, copy=False)
        if arr.shape[1:] != self.input_shape_:
            if arr.ndim == 2 and len(self.input_shape_) == 1:
                raise ValueError(
                    f"X has {arr.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
            raise ValueError(
                f"X has trailing shape {arr.shape[1:]}, but {type(self).__name__} was fitted on "
                f"{self.input_shape_}."
            )
        return X


class HydraSampler(_HydraBase):
    """HYDRA as an imbalanced-learn sampler: ``fit_resample`` drops flagged rows.

    Same parameters and fitted attributes as :class:`HydraLabelCleaner`. It
    has no ``transform``, so imbalanced-learn's Pipeline accepts it before a
    final classifier; the sampler acts only when the pipeline is fitted.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from hydraclean import HydraSampler
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4)).astype("float32"); y = (X[:, 0] > 0).astype(int)
    >>> sampler = HydraSampler(torch.nn.Linear(4, 2), drop_fraction=0.1, max_epochs=2, random_state=0)
    >>> X_res, y_res = sampler.fit_resample(X, y, X_val=X[:20], y_val=y[:20])
    >>> X_res.shape
    (54, 4)
    """

    _validation_hint = (
        " Inside an imbalanced-learn Pipeline, a sampler's fit parameters reach it only with "
        "metadata routing enabled (imbalanced-learn <= 0.14.2 drops them otherwise): call "
        "sklearn.set_config(enable_metadata_routing=True) and pass pipe.fit(X, y, X_val=..., y_val=...)."
    )
