"""The one-run peers on every setting of the score choice: AUM, forgetting events and Cartography's confidence.

Each is read from one ordinary training run (the suite's recipe, model seed 0,
no hypergradient): AUM by its authors' ``aum`` package, forgetting events
(Toneva et al. 2019: how often a sample, classified correctly at one
presentation, is classified wrongly at the next; a sample never classified
correctly counts above all others) and Dataset Cartography's confidence
(Swayamdipta et al. 2020: the probability of the observed label, averaged over
the run). Beside them, from docs/_generated/score_selection.json (the same
settings' default fits): the default score's AUROC and the fit's own AUM
(``scoring="aum"``) and mean probability of the label, which should match the
package's AUM and the confidence on the same run.

    python benchmarks/one_run_peers.py --out docs/_generated/one_run_peers.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flag_count import HELD_OUT, SELECTION  # noqa: E402
from methods import init_module, one_run_scores  # noqa: E402
from score_ablation import DEFAULT_SCORE  # noqa: E402
from settings import SETTINGS, load_data  # noqa: E402

PEERS = ("AUM", "forgetting events", "Cartography confidence")
#: score_selection.json's variants that are these peers computed from the default fit's own trace
FIT_OWN = {"aum": "the fit's own AUM", "trajectory mean probability of the label": "the fit's own confidence"}
GENERATED = Path(__file__).resolve().parent.parent / "docs" / "_generated"


def peer_aurocs(name: str, smoke: bool = False) -> dict[str, float]:
    """AUROC of each one-run peer against the flipped labels of setting ``name``, and the run's seconds."""
    setting = SETTINGS[name]
    make_module, recipe, X_tr, y_clean, *_ = load_data(setting, smoke)
    y_noisy, noise = setting.make_noise(y_clean, X_tr)
    t0 = time.perf_counter()
    scores = one_run_scores(init_module(make_module, 0), torch.as_tensor(X_tr), torch.as_tensor(y_noisy), recipe,
                            seed=0)
    out = {p: float(roc_auc_score(noise, -scores[p])) for p in PEERS}
    return {**out, "seconds": time.perf_counter() - t0}


def markdown(table: dict[str, dict], selection: dict | None) -> str:
    names = list(table)
    columns = [*PEERS] + ([f"default ({DEFAULT_SCORE})", *FIT_OWN.values()] if selection else [])
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for n in names:
        cells = [f"{table[n][p]:.3f}" for p in PEERS]
        if selection:
            cells += [f"{selection[k][n]:.3f}" for k in (DEFAULT_SCORE, *FIT_OWN)]
        lines.append(f"| {n}{' (held out)' if n in HELD_OUT else ''} | " + " | ".join(cells) + " |")
    for group, members in (("selection", [n for n in names if n in SELECTION]),
                           ("held out", [n for n in names if n in HELD_OUT])):
        if not members:
            continue
        cells = [f"{np.mean([table[n][p] for n in members]):.4f}" for p in PEERS]
        if selection:
            cells += [f"{np.mean([selection[k][n] for n in members]):.4f}" for k in (DEFAULT_SCORE, *FIT_OWN)]
        lines.append(f"| mean ({group}, {len(members)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SELECTION + HELD_OUT, choices=list(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="tiny data and recipes (CI)")
    parser.add_argument("--out", default=None, help="markdown path (a .json beside it); stdout otherwise")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = {}
    for name in args.settings:
        table[name] = peer_aurocs(name, args.smoke)
        print(f"{name}: " + ", ".join(f"{p} {table[name][p]:.3f}" for p in PEERS)
              + f" ({table[name]['seconds']:.0f} s)", file=sys.stderr)
    path = GENERATED / "score_selection.json"
    selection = None
    if not args.smoke and path.exists():
        selection = json.loads(path.read_text())
        selection = selection if all(n in selection[DEFAULT_SCORE] for n in table) else None
    header = (f"Command: `python benchmarks/one_run_peers.py`. {__doc__.split(chr(10) + chr(10))[1]}\n\n"
              "AUROC against the flipped labels (higher is better).\n\n")
    text = header + markdown(table, selection) + "\n"
    if args.out is None:
        print(text)
        return
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
