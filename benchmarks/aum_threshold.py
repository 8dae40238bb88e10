"""Why AUM's threshold-sample flags cover most of the data on digits: the runs with a fake class.

AUM's flag rule (Pleiss et al. 2020) trains again with ``N / (c + 1)`` samples
moved to a fake extra class and flags what falls at or below the 99th
percentile of those threshold samples' AUM. For each setting, the same recipe
and seed as the suite: the median AUM of the correctly labelled samples in the
ordinary run and in the first threshold run, and the 99th percentile of the
threshold samples' AUM (the flag threshold).

    python benchmarks/aum_threshold.py [--settings digits-sym-0.2 ...] [--out docs/_generated/aum_threshold.md]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from methods import _aum_run, init_module, with_extra_class
from settings import SETTINGS, load_data

from hydraclean.training import step_rng


def probe(name: str) -> str:
    setting = SETTINGS[name]
    make_module, recipe, X, y_clean, *_ = load_data(setting, False)
    y_noisy, noise = setting.make_noise(y_clean, X)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y_noisy)
    ordinary = _aum_run(init_module(make_module, 0), Xt, yt, recipe, 0)
    n_classes = int(yt.max()) + 1
    threshold_set = np.random.default_rng(0).permutation(len(yt))[: len(yt) // (n_classes + 1)]
    fake = yt.clone()
    fake[torch.as_tensor(threshold_set)] = n_classes
    with step_rng(0, torch.device("cpu")):
        module = with_extra_class(make_module())
    margins = _aum_run(module, Xt, fake, recipe, 0)
    rest = np.setdiff1d(np.arange(len(yt)), threshold_set)
    clean = rest[~noise[rest]]
    threshold = np.percentile(margins[threshold_set], 99)
    return (f"| {setting.title} | {np.median(ordinary[~noise]):.3f} | {np.median(margins[clean]):.3f} | "
            f"{threshold:.3f} | {(margins[rest] <= threshold).mean():.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-sym-0.2", "digits-pairs"], choices=sorted(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    lines = [f"Command: `python benchmarks/aum_threshold.py --settings {' '.join(args.settings)}`; noise and model "
             "seed 0.", "",
             "| setting | median AUM of correct labels, ordinary run | the same, first threshold run | "
             "99th percentile of threshold samples' AUM | share of the judged samples at or below it |",
             "|---|---|---|---|---|"]
    lines += [probe(name) for name in args.settings]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
