"""Write the summary at the top of docs/benchmarks.md from the suites' and the paper script's JSON.

Every number in the summary comes from those files: two figures (AUROC by
method and setting; cost against AUROC), the default against the acceptance
bar per setting (✗ where it falls short), and the paper's experiments.

    python benchmarks/summarize.py [--dir docs/_generated]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT, PAPER, CLUSTER = "HYDRA default", "HYDRA C(i), paper", "HYDRA cluster"
METHODS = [DEFAULT, PAPER, CLUSTER, "cleanlab", "training loss", "influence (LiSSA)", "TracInCP"]


def load_suites(d: Path) -> list[dict]:
    """Every setting of every suite_*.json, in the order of benchmarks/settings.py."""
    from settings import SETTINGS

    results = {}
    for path in sorted(d.glob("suite_*.json")):
        for res in json.loads(path.read_text()):
            results[res["setting"]] = res
    return [results[n] for n in SETTINGS if n in results]


def acceptance_table(results: list[dict]) -> list[str]:
    """Per setting: the default against cleanlab by AUROC, flag F1, and retraining."""
    lines = [
        "| setting | AUROC default | AUROC cleanlab | AUROC paper C(i) | F1 auto (flagged / flipped) | F1 cleanlab "
        "(flagged) | retrain default | no cleaning | drop exactly the flipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        m = res["methods"]
        d, c = m[DEFAULT], m["cleanlab"]
        mark = lambda ok: "" if ok else " ✗"  # noqa: E731
        needs_cleaning = m["oracle (drop the flipped)"]["retrain"][0] >= m["no cleaning"]["retrain"][0] + 0.01
        retrain_ok = not needs_cleaning or d["retrain"][0] >= m["no cleaning"]["retrain"][0]
        lines.append(
            f"| {res['title']} | {d['auroc']:.3f}{mark(d['auroc'] >= c['auroc'])} | {c['auroc']:.3f} | "
            f"{m[PAPER]['auroc']:.3f} | {d['f1']:.3f}{mark(d['f1'] >= c['f1'])} ({d['n_flagged']} / {res['n_flipped']})"
            f" | {c['f1']:.3f} ({c['n_flagged']}) | {d['retrain'][0]:.3f}{mark(retrain_ok)} | "
            f"{m['no cleaning']['retrain'][0]:.3f} | {m['oracle (drop the flipped)']['retrain'][0]:.3f} |"
        )
    wins = sum(r["methods"][DEFAULT]["auroc"] >= r["methods"]["cleanlab"]["auroc"] for r in results)
    f1_wins = sum(r["methods"][DEFAULT]["f1"] >= r["methods"]["cleanlab"]["f1"] for r in results)
    lines += ["", f"✗ marks a shortfall against the acceptance bar: AUROC or F1 below cleanlab's, or retraining on the "
              "kept rows less accurate than no cleaning where dropping exactly the flipped samples gains a point or "
              f"more. The default's AUROC is at least cleanlab's on {wins} of {len(results)} settings and its "
              f"auto-count F1 on {f1_wins} of {len(results)}. Retraining uses the noisy labels of the kept rows."]
    return lines


def figures(results: list[dict], d: Path) -> list[str]:
    """AUROC by method and setting; mean cost against mean AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # a method a setting could not run (LiSSA without a second derivative) is NaN: left out of its mean
    auroc = np.array([[r["methods"].get(m, {"auroc": np.nan})["auroc"] for m in METHODS] for r in results])
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(results) + 1.6))
    im = ax.imshow(auroc, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(METHODS)), METHODS, rotation=30, ha="right")
    ax.set_yticks(range(len(results)), [r["title"] for r in results])
    for i in range(auroc.shape[0]):
        best = np.nanmax(auroc[i])
        for j in range(auroc.shape[1]):
            ax.text(j, i, "n/a" if np.isnan(auroc[i, j]) else f"{auroc[i, j]:.3f}", ha="center", va="center", fontsize=7,
                    color="black" if auroc[i, j] > 0.8 else "white", weight="bold" if auroc[i, j] == best else None)
    fig.colorbar(im, ax=ax, label="AUROC (flipped labels)")
    ax.set_title("Ranking mislabelled samples: AUROC by method and setting (bold: best)")
    fig.tight_layout()
    fig.savefig(d / "auroc_by_setting.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, m in enumerate(METHODS):
        ratios = [r["methods"][m]["time_ratio"] for r in results if m in r["methods"]]
        ax.scatter(np.mean(ratios), np.nanmean(auroc[:, j]), s=40)
        ax.annotate(m, (np.mean(ratios), np.nanmean(auroc[:, j])), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("mean time, x one plain training run (same process)")
    ax.set_ylabel(f"mean AUROC over {len(results)} settings")
    ax.set_title("Cost against detection")
    fig.tight_layout()
    fig.savefig(d / "cost_vs_auroc.png", dpi=110)
    plt.close(fig)
    return ["![AUROC by method and setting](_generated/auroc_by_setting.png)", "",
            "![Mean cost against mean AUROC](_generated/cost_vs_auroc.png)"]


def paper_lines(paper: dict) -> list[str]:
    t4 = paper["table4"]
    curves = paper["curves"]
    hydra, inf = curves["HYDRA"][-1], curves["influence functions"][-1]
    h1000 = t4["HYDRA, 1000 features"]
    h100 = t4["HYDRA, 100 features"]
    i100 = t4["influence functions (LiSSA), 100 features"]
    err = curves["error_norm"]
    first = curves["HYDRA"][0]
    line = (
        f"- **Approximation (paper Figs 3-5)**: against the exact Hessian-aware contributions of the tracked "
        f"samples, Hessian-free HYDRA has a sign-error rate of {hydra[0]:.3f} and Spearman {hydra[1]:.3f} after the "
        f"last epoch; influence functions {inf[0]:.3f} and {inf[1]:.3f} (paper: 0.014 / 0.986 and 0.130 / 0.820). "
        f"The mean norm of the difference between the exact and the Hessian-free hypergradients goes from "
        f"{err[0]:.3g} after epoch {curves['epoch'][0]} to {err[-1]:.3g} after epoch {curves['epoch'][-1]} (the "
        "paper: it stabilises at 0.74)."
    )
    if hydra[1] < 0.9:
        line += (
            f" So the paper's result does not reproduce in this setting. After the first epoch the agreement was "
            f"{first[0]:.3f} sign errors and Spearman {first[1]:.3f}. The Hessian-free hypergradient is a weighted "
            "sum of per-step gradients and grows at most linearly with the number of steps, so a difference that "
            "grows by orders of magnitude means the exact one does: the paper's Condition 6 (bounded "
            "hypergradients) fails along this run (constant lr, momentum 0.9). The exact mode equals autograd "
            "through the unrolled training to about 1e-16 in the tests."
        )
    return [
        line,
        f"- **Clustering (paper Table 4, 50% noise)**: Jaccard (correct / random labels) {h1000[0]:.3f} / "
        f"{h1000[1]:.3f} for HYDRA with 1,000 features, {h100[0]:.3f} / {h100[1]:.3f} with 100, and "
        f"{i100[0]:.3f} / {i100[1]:.3f} for influence functions with 100 (paper: HYDRA 0.781 / 0.777, influence "
        "functions 0.413 / 0.332, on 60,000 samples).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="docs/_generated")
    args = parser.parse_args()
    d = Path(args.dir)
    results = load_suites(d)
    lines = []
    if results:
        lines += figures(results, d) + ["", "### The default against the acceptance bar", ""]
        lines += acceptance_table(results)
    if (d / "paper.json").exists():
        lines += ["", "### The paper's experiments", ""] + paper_lines(json.loads((d / "paper.json").read_text()))
    lines += ["", "Generated by `python benchmarks/summarize.py` from the tables below."]
    (d / "benchmarks_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
