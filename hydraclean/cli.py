"""The ``hydraclean`` command: ``demo`` and ``clean``."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from . import __version__
from .datasets import load_digits_images, make_label_noise
from .estimator import HydraLabelCleaner
from .evaluation import detection_metrics, retrain_accuracy
from .models import MLP, LeNet5, SmallCNN
from .schedules import ExponentialDecay
from .scoring import SCORES
from .training import LearningShortfallWarning

__all__ = ["main"]

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
EXIT_OK, EXIT_BAD_INPUT, EXIT_DID_NOT_LEARN, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_CODES = (
    "exit status: 0 the cleaned file and the report were written; 2 bad arguments or input (nothing written); "
    "3 the model did not learn, so its scores mean nothing (nothing written; --write-anyway writes them); "
    "130 interrupted (Ctrl-C; with --checkpoint-dir the run is saved there, and the same command resumes it)."
)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, as the CLI raises it. A subclass, because under ``python -m`` CPython ends the process by SIGINT,
    whatever :func:`main` returns, once a plain KeyboardInterrupt has left any ``eval`` of a string on its way
    (torch's TorchScript compiler evaluates strings), and the exit status would then not be 130."""


@contextlib.contextmanager
def _interrupts_as_exit_status() -> Iterator[None]:
    def handler(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [
        ["" if r.get(k) is None else format(r[k], f) for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[c]) for row in cells) for c in range(len(columns))]
    lines = ["  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(noise: float = 0.2, epochs: int = 15, seed: int = 0, verbose: int = 0, out=sys.stdout) -> list[dict]:
    """Digits with injected symmetric label noise, cleaned by both strategies.

    Returns the table's rows (one per method) and prints the table.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    X, y = load_digits_images()
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=seed)
    y_noisy, noise_mask = make_label_noise(y_train, noise, random_state=seed)
    # a learning rate decaying by 0.8 per epoch: steadier scores than a constant one (see the user guide)
    settings = dict(max_epochs=epochs, batch_size=32, lr=0.1, lr_schedule=ExponentialDecay(0.8), momentum=0.9)
    n_steps = epochs * -(-len(y_train) // 32)
    retrain = dict(n_steps=n_steps, batch_size=32, lr=0.1, total_decay=0.8**epochs, seed=seed)
    print(
        f"digits: {len(y_train)} training samples with {noise_mask.sum()} flipped labels "
        f"({noise:.0%} symmetric noise), {len(y_val)} trusted validation, {len(y_test)} test; "
        f"SmallCNN, {epochs} epochs of SGD (lr 0.1 x 0.8 per epoch)",
        file=out,
    )
    # an untimed few steps first, so that torch's one-off start-up cost does not land on the baseline
    retrain_accuracy(SmallCNN, X_train, y_noisy, X_test, y_test, **{**retrain, "n_steps": 5})
    t0 = time.perf_counter()
    rows = [{"method": "no cleaning", "test_acc": retrain_accuracy(SmallCNN, X_train, y_noisy, X_test, y_test, **retrain)}]
    plain_time = time.perf_counter() - t0
    rows[0]["time"] = plain_time
    variants = {  # name: the cleaner's parameters beyond the recipe
        "HYDRA (defaults)": {},
        f"HYDRA paper C(i), drop {noise:.0%}": {"scoring": "contribution", "drop_fraction": noise},
        "HYDRA cluster": {"strategy": "cluster", "n_val_features": len(y_val)},
    }
    for name, params in variants.items():
        cleaner = HydraLabelCleaner(SmallCNN, random_state=seed, verbose=verbose, **settings, **params)
        t0 = time.perf_counter()
        cleaner.fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
        elapsed = time.perf_counter() - t0
        keep = cleaner.support_
        row = {"method": name, "time": elapsed, "ratio": elapsed / plain_time}
        row.update(detection_metrics(noise_mask, cleaner.label_quality_, cleaner.label_issues_))
        row["test_acc"] = retrain_accuracy(SmallCNN, X_train[keep], y_noisy[keep], X_test, y_test, **retrain)
        rows.append(row)
    rows.append({"method": "true labels (oracle)",
                 "test_acc": retrain_accuracy(SmallCNN, X_train, y_train, X_test, y_test, **retrain)})
    columns = [
        ("method", "method", "s"), ("n_flagged", "flagged", "d"), ("precision", "precision", ".3f"),
        ("recall", "recall", ".3f"), ("f1", "F1", ".3f"), ("auroc", "AUROC", ".3f"),
        ("test_acc", "test acc", ".3f"), ("time", "time s", ".1f"), ("ratio", "x plain", ".1f"),
    ]
    print(_table(rows, columns), file=out)
    print("AUROC of label_quality_ against the flipped labels. test acc: the same model retrained from scratch "
          "on the kept samples with their noisy labels, same number of SGD steps. 'x plain': fit time / one "
          "plain training run.", file=out)
    return rows


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _image_shape(model: str, X: np.ndarray) -> tuple[int, ...]:
    """The per-sample shape ``model`` needs, checked against X's values per sample."""
    per_sample = int(np.prod(X.shape[1:]))
    if model == "mlp":
        return (per_sample,)
    sides = {"small-cnn": (8,), "lenet5": (28, 32)}[model]
    if X.ndim == 4:
        if X.shape[2] == X.shape[3] and X.shape[2] in sides:
            return tuple(X.shape[1:])
    else:
        for side in sides:
            if per_sample % (side * side) == 0 and per_sample // (side * side) in (1, 3):
                return (per_sample // (side * side), side, side)
    need = " or ".join(f"{s}x{s}" for s in sides)
    raise CLIError(
        f"--model {model} needs {need} images (1 or 3 channels); the input has {per_sample} values per sample "
        f"(shape {X.shape[1:]}). Use --model mlp for other data."
    )


def _make_module(model: str, shape: tuple[int, ...]):
    channels = shape[0] if len(shape) == 3 else 1
    if model == "mlp":
        return lambda n_features, n_classes: MLP(n_features, n_classes, hidden=(128,))
    if model == "small-cnn":
        return lambda n_classes: SmallCNN(n_classes, in_channels=channels)
    return lambda n_classes: LeNet5(n_classes, in_channels=channels, input_size=shape[-1])


def _read_npz(path: Path) -> dict:
    if not zipfile.is_zipfile(path):
        raise CLIError(f"{path} is not a valid .npz archive (an .npz file is a zip of .npy arrays, as "
                       "numpy.savez writes); convert the data with numpy.savez(path, X=..., y=...).")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path} could not be read as an .npz file ({exc}).") from exc
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise CLIError(f"{path} has arrays {sorted(arrays)}; it needs 'X' and 'y' (optionally 'X_val', 'y_val').")
    if ("X_val" in arrays) != ("y_val" in arrays):
        raise CLIError(f"{path} has only one of 'X_val' and 'y_val'; give both or neither.")
    return arrays


def _read_csv(path: Path, label_column: str) -> tuple[list[str], list[list[str]], np.ndarray, np.ndarray]:
    """Header, raw rows, features (n, d) float and labels (n,) str."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = [r for r in reader if r]
    if header is None:
        raise CLIError(f"{path} is empty; a .csv input needs a header row and one row per sample.")
    if label_column not in header:
        raise CLIError(f"{path} has no column {label_column!r} (columns: {', '.join(header[:20])}); "
                       "name the label column with --label-column.")
    li = header.index(label_column)
    bad = [k for k, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise CLIError(f"{path}: row {bad[0] + 2} has {len(rows[bad[0]])} fields but the header has {len(header)}.")
    try:
        X = np.array([[float(v) for j, v in enumerate(r) if j != li] for r in rows], dtype=np.float32)
    except ValueError:
        k, j = next((k, j) for k, r in enumerate(rows) for j, v in enumerate(r) if j != li and not _is_number(v))
        what = "a missing value" if not rows[k][j].strip() else f"the non-numeric value {rows[k][j]!r}"
        raise CLIError(f"{path}: {what} at row {k + 2}, column {header[j]!r}; every column except "
                       f"{label_column!r} must hold numbers (impute or drop missing values first).") from None
    return header, rows, X.reshape(len(rows), -1), np.array([r[li] for r in rows])


def standardize(X: np.ndarray, X_val: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each feature to mean 0 and standard deviation 1 over the training rows; X_val with the same statistics.

    Constant features are only centred. The files written keep the original values.
    """
    flat = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    mean, sd = flat.mean(0), flat.std(0)
    sd = np.where(sd > 0, sd, 1.0)

    def scale(A):
        return ((np.asarray(A, dtype=np.float64).reshape(len(A), -1) - mean) / sd).reshape(np.shape(A))

    return scale(X), None if X_val is None else scale(X_val)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_writable(*paths: Path) -> None:
    """Fail before any work when an output cannot be written."""
    for path in paths:
        folder = path.parent
        if not folder.is_dir():
            raise CLIError(f"cannot write {path}: the folder {folder} does not exist; create it first.")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CLIError(f"cannot write {path}: permission denied.")


def run_clean(args: argparse.Namespace) -> int:
    """``hydraclean clean``: read, clean, write the cleaned file and the report."""
    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise CLIError(f"input file {src} does not exist.")
    kind = src.suffix.lower()
    if kind not in (".npz", ".csv") or out.suffix.lower() != kind:
        raise CLIError(f"input and output must both be .npz or both .csv; got {src.name} and {out.name}.")
    report = Path(args.report) if args.report else out.with_name(out.stem + "_report.csv")
    _check_writable(out, report)
    if kind == ".npz":
        arrays = _read_npz(src)
        X, y = arrays["X"], arrays["y"]
        X_val, y_val = arrays.get("X_val"), arrays.get("y_val")
    else:
        header, rows, X, y = _read_csv(src, args.label_column)
        X_val = y_val = None
    if args.validation:
        vsrc = Path(args.validation)
        if not vsrc.is_file() or vsrc.suffix.lower() != kind:
            raise CLIError(f"--validation {vsrc} must be an existing {kind} file.")
        if kind == ".npz":
            varrays = _read_npz(vsrc)
            X_val, y_val = varrays["X"], varrays["y"]
        else:
            _, _, X_val, y_val = _read_csv(vsrc, args.label_column)
    shape = _image_shape(args.model, X)
    if args.standardize:
        X, X_val = standardize(X, X_val)
    X_in = X.reshape(len(X), *shape).astype(np.float32, copy=False)
    X_val_in = None if X_val is None else np.asarray(X_val).reshape(len(X_val), *shape).astype(np.float32, copy=False)
    cleaner = HydraLabelCleaner(
        _make_module(args.model, shape), strategy=args.strategy, scoring=args.scoring,
        drop_fraction=args.drop_fraction,
        n_val_features=args.n_val_features, hessian=args.hessian, max_epochs=args.epochs,
        batch_size=args.batch_size, optimizer=_OPTIMIZERS[args.optimizer], lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_schedule=ExponentialDecay(args.lr_decay) if args.lr_decay < 1 else "constant",
        validation_fraction=args.validation_fraction, device=args.device, random_state=args.seed,
        verbose=args.verbose, checkpoint_dir=args.checkpoint_dir, keep_checkpoint=args.keep_checkpoint,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        cleaner.fit(X_in, y, X_val=X_val_in, y_val=y_val)
    for w in caught:
        print(f"hydraclean: warning: {w.message}", file=sys.stderr)
    if not args.write_anyway and any(issubclass(w.category, LearningShortfallWarning) for w in caught):
        print("hydraclean clean: nothing written: the model did not learn (see the warning above); fix the "
              "training (--standardize, --epochs, --lr) or pass --write-anyway.", file=sys.stderr)
        return EXIT_DID_NOT_LEARN
    keep = cleaner.support_
    if kind == ".npz":
        kept = {"X": X[keep], "y": y[keep]}
        if X_val is not None and not args.validation:
            kept.update(X_val=arrays["X_val"], y_val=arrays["y_val"])
        np.savez(out, **kept)
    else:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(r for r, k in zip(rows, keep) if k)
    n, k = len(y), len(cleaner.classes_)

    def cells(values, width):  # a score without hypergradient leaves the contributions out: empty cells
        return [[""] * width] * n if values is None else [[repr(float(v)) for v in np.atleast_1d(r)] for r in values]

    columns = zip(cells(cleaner.label_quality_, 1), cells(cleaner.contribution_, 1),
                  cells(cleaner.class_contribution_, k))
    suggested = [""] * n if cleaner.suggested_label_ is None else cleaner.suggested_label_
    with open(report, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "label", "flagged", "suggested_label", "label_quality", "contribution"]
                        + [f"class_contribution_{c}" for c in cleaner.classes_])
        for i, (quality, contribution, by_class) in enumerate(columns):
            writer.writerow([i, y[i], int(cleaner.label_issues_[i]), suggested[i], *quality, *contribution,
                             *by_class])
    print(f"flagged {int(cleaner.label_issues_.sum())} of {len(y)} rows in {time.perf_counter() - t0:.1f} s; "
          f"wrote {out} ({int(keep.sum())} rows) and {report}")
    return EXIT_OK


def _fraction_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a fraction in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraclean",
        description="Find mislabelled training data with HYDRA (hypergradient data relevance analysis).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="clean scikit-learn's digits with injected label noise and report detection")
    demo.add_argument("--noise", type=float, default=0.2, help="fraction of labels flipped per class (default 0.2)")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("-v", "--verbose", action="count", default=0, help="progress bars")

    clean = sub.add_parser(
        "clean",
        help="flag and drop likely mislabelled rows of an .npz or .csv file",
        description="Train a model with HYDRA on INPUT, write the kept rows to OUTPUT (same format) and a "
        "per-sample report (row, label, flagged, suggested_label, label_quality, contribution and one "
        "class_contribution_<class> column per class). An .npz file holds arrays X and y "
        "and optionally a trusted X_val, y_val; a .csv file has a header, one label column and numeric features.",
        epilog=EXIT_CODES,
    )
    clean.add_argument("input", help="input .npz or .csv file")
    clean.add_argument("-o", "--output", required=True, help="cleaned output file, same format as the input")
    clean.add_argument("--report", help="per-sample report CSV (default: OUTPUT_report.csv)")
    clean.add_argument("--label-column", default="label", help="label column of a .csv input (default: label)")
    clean.add_argument("--validation", help="trusted validation set, same format as the input (else X_val in the "
                       ".npz, else a held-out --validation-fraction)")
    clean.add_argument("--model", choices=["mlp", "small-cnn", "lenet5"], default="mlp",
                       help="mlp (any input), small-cnn (8x8 images), lenet5 (28x28 or 32x32 images); default mlp")
    clean.add_argument("--strategy", choices=["drop", "cluster"], default="drop", help="default drop")
    clean.add_argument("--standardize", action="store_true",
                       help="scale each feature to mean 0, sd 1 over the training rows before training (tabular "
                       "data; the files written keep the original values)")
    clean.add_argument("--scoring", choices=sorted(SCORES), default="memorisation_weighted",
                       help="label-quality score that ranks the rows (default memorisation_weighted; contribution is "
                       "the paper's)")
    clean.add_argument("--drop-fraction", type=_fraction_or_auto, default="auto",
                       help="fraction flagged by 'drop', or auto to estimate it (default auto)")
    clean.add_argument("--n-val-features", type=int, default=1000, help="validation features for 'cluster'")
    clean.add_argument("--hessian", choices=["free", "exact"], default="free", help="default free")
    clean.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    clean.add_argument("--batch-size", type=int, default=64, help="default 64")
    clean.add_argument("--optimizer", choices=sorted(_OPTIMIZERS), default="sgd", help="default sgd")
    clean.add_argument("--lr", type=float, default=None,
                       help="learning rate (default 0.01 for sgd, torch's 1e-3 for adam and adamw)")
    clean.add_argument("--lr-decay", type=float, default=1.0, help="learning-rate factor per epoch (default 1)")
    clean.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (default 0.9)")
    clean.add_argument("--weight-decay", type=float, default=None,
                       help="default 0 for sgd and adam, torch's 1e-2 for adamw (decoupled)")
    clean.add_argument("--validation-fraction", type=float, default=0.1,
                       help="held out when no validation set is given (default 0.1)")
    clean.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    clean.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    clean.add_argument("--checkpoint-dir", help="save the run there at every epoch and on Ctrl-C; the same command "
                       "then resumes it (removed after success unless --keep-checkpoint)")
    clean.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after success")
    clean.add_argument("--write-anyway", action="store_true",
                       help="write the output even when the model did not learn (exit status 0, not 3)")
    clean.add_argument("-v", "--verbose", action="count", default=0, help="progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            run_demo(args.noise, args.epochs, args.seed, args.verbose)
        return 0
    try:
        with _interrupts_as_exit_status():
            return run_clean(args)
    except (CLIError, ValueError, TypeError) as exc:
        print(f"hydraclean clean: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        where = (f"the run is saved in {args.checkpoint_dir}: run the same command again to resume"
                 if args.checkpoint_dir else "nothing was saved (--checkpoint-dir keeps a run that can resume)")
        print(f"hydraclean clean: interrupted; {where}.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
