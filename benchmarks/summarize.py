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
METHODS = [DEFAULT, PAPER, CLUSTER, "cleanlab", "AUM", "training loss", "influence (LiSSA)", "TracInCP"]


def load_suites(d: Path) -> list[dict]:
    """Every setting of every suite_*.json, in the order of benchmarks/settings.py."""
    from settings import SETTINGS

    results = {}
    for path in sorted(d.glob("suite_*.json")):
        for res in json.loads(path.read_text()):
            results[res["setting"]] = res
    return [results[n] for n in SETTINGS if n in results]


def acceptance_table(results: list[dict]) -> list[str]:
    """Per setting: the default against the one-run peers by AUROC, the flag count and F1, cluster, retraining.

    The bars (issue 19): the default's AUROC at least max(cleanlab, AUM, final training loss) - 0.005; the
    automatic count within 25% of the true number of flips; its F1 at least max(cleanlab's, AUM's threshold
    rule's); the cluster strategy's F1 at least the automatic count's; retraining on the kept rows at least
    as accurate as no cleaning where dropping exactly the flipped samples gains a point. AUM is "—" in a
    setting whose JSON predates it (run before the peer was added).
    """
    lines = [
        "| setting | AUROC default | AUROC cleanlab | AUROC AUM | AUROC final loss | AUROC paper C(i) | "
        "flagged / flipped (auto) | F1 auto | F1 cleanlab (flagged) | F1 AUM (flagged) | F1 cluster (flagged) | "
        "retrain default | no cleaning | drop exactly the flipped |",
        "|---|" + "---|" * 13,
    ]
    mark = lambda ok: "" if ok else " ✗"  # noqa: E731
    missing = {"auroc": float("nan"), "f1": float("nan"), "n_flagged": "—"}
    shortfalls = {"auroc": 0, "count": 0, "f1": 0, "cluster": 0}
    for res in results:
        m = res["methods"]
        d, c, loss, cl = m[DEFAULT], m["cleanlab"], m["training loss"], m[CLUSTER]
        a = m.get("AUM", missing)
        bar = max(c["auroc"], loss["auroc"], a["auroc"] if "AUM" in m else -1.0) - 0.005
        f1_bar = max(c["f1"], a["f1"] if "AUM" in m else -1.0)
        within = abs(d["n_flagged"] - res["n_flipped"]) <= 0.25 * res["n_flipped"]
        needs_cleaning = m["oracle (drop the flipped)"]["retrain"][0] >= m["no cleaning"]["retrain"][0] + 0.01
        retrain_ok = not needs_cleaning or d["retrain"][0] >= m["no cleaning"]["retrain"][0]
        for key, ok in (("auroc", d["auroc"] >= bar), ("count", within), ("f1", d["f1"] >= f1_bar),
                        ("cluster", cl["f1"] >= d["f1"])):
            shortfalls[key] += not ok
        fmt = lambda r, k: "—" if r is missing else f"{r[k]:.3f}"  # noqa: E731
        lines.append(
            f"| {res['title']} | {d['auroc']:.3f}{mark(d['auroc'] >= bar)} | {c['auroc']:.3f} | {fmt(a, 'auroc')} | "
            f"{loss['auroc']:.3f} | {m[PAPER]['auroc']:.3f} | {d['n_flagged']} / {res['n_flipped']}{mark(within)} | "
            f"{d['f1']:.3f}{mark(d['f1'] >= f1_bar)} | {c['f1']:.3f} ({c['n_flagged']}) | "
            f"{fmt(a, 'f1')} ({a['n_flagged']}) | {cl['f1']:.3f} ({cl['n_flagged']}){mark(cl['f1'] >= d['f1'])} | "
            f"{d['retrain'][0]:.3f}{mark(retrain_ok)} | {m['no cleaning']['retrain'][0]:.3f} | "
            f"{m['oracle (drop the flipped)']['retrain'][0]:.3f} |"
        )
    n = len(results)
    row, mean_ok = mean_row(results)
    lines.append(row)
    lines += ["", "✗ marks a shortfall against issue 19's bars: the default's AUROC below the best of cleanlab, AUM "
              "and the final training loss minus 0.005; an automatic flag count more than 25% away from the true "
              "number of flips; the automatic count's F1 below cleanlab's or AUM's; the cluster strategy's F1 below "
              "the automatic count's; retraining on the kept rows less accurate than no cleaning where dropping "
              "exactly the flipped samples gains a point or more. "
              f"Shortfalls over {n} settings: AUROC {shortfalls['auroc']}, flag count {shortfalls['count']}, "
              f"F1 {shortfalls['f1']}, cluster {shortfalls['cluster']}; the suite mean {0 if mean_ok else 1}. "
              "A setting whose AUM cells read — was run before AUM joined the suite; its bars leave AUM out. "
              "Retraining uses the noisy labels of the kept rows. "
              f"On the mean row, ✗ marks the default's mean AUROC below AUM's plus {MEAN_MARGIN} (issue 19's bar on "
              "the suite mean, over the settings run with AUM; each column's mean is over the settings that have it)."]
    return lines


#: Issue 19: the default's mean AUROC over the suite at least AUM's plus this.
MEAN_MARGIN = 0.01


def mean_row(results: list[dict]) -> tuple[str, bool]:
    """The acceptance table's last row (each column's mean over the settings that have it, the flag counts
    summed; ✗ where the default's mean AUROC, over the settings run with AUM, is below AUM's + MEAN_MARGIN),
    and whether that bar is met."""
    import numpy as np

    ms = [r["methods"] for r in results]
    mean = lambda method, key: float(np.mean([m[method][key] for m in ms if method in m]))  # noqa: E731
    retrain = lambda method: float(np.mean([m[method]["retrain"][0] for m in ms]))  # noqa: E731
    with_aum = [m for m in ms if "AUM" in m]  # the bar compares the two over the same settings
    ok = bool(with_aum) and (np.mean([m[DEFAULT]["auroc"] for m in with_aum])
                             >= np.mean([m["AUM"]["auroc"] for m in with_aum]) + MEAN_MARGIN)
    flagged = sum(m[DEFAULT]["n_flagged"] for m in ms)
    return (f"| **mean over {len(results)} settings** | {mean(DEFAULT, 'auroc'):.4f}{'' if ok else ' ✗'} | "
            f"{mean('cleanlab', 'auroc'):.4f} | {mean('AUM', 'auroc'):.4f} | {mean('training loss', 'auroc'):.4f} | "
            f"{mean(PAPER, 'auroc'):.4f} | {flagged} / {sum(r['n_flipped'] for r in results)} | "
            f"{mean(DEFAULT, 'f1'):.3f} | {mean('cleanlab', 'f1'):.3f} | {mean('AUM', 'f1'):.3f} | "
            f"{mean(CLUSTER, 'f1'):.3f} | {retrain(DEFAULT):.3f} | {retrain('no cleaning'):.3f} | "
            f"{retrain('oracle (drop the flipped)'):.3f} |"), ok


#: Issue 19: "no flags, or very few, on clean data"; read here as at most this share of the rows.
CLEAN_SHARE = 0.02


def clean_lines(flag_count: dict) -> list[str]:
    """The automatic count's share of rows flagged on the clean settings of benchmarks/flag_count.py."""
    from score_ablation import DEFAULT_COUNT

    shares = {name: r["share"] for name, r in flag_count.get(DEFAULT_COUNT, {}).items() if "share" in r}
    if not shares:
        return []
    cells = ", ".join(f"{name} {share:.1%}{'' if share <= CLEAN_SHARE else ' ✗'}" for name, share in shares.items())
    return ["", f"On clean labels (no flip; benchmarks/flag_count.py, the suite's recipes), `drop_fraction=\"auto\"` "
            f"flags: {cells} of the rows (✗: more than {CLEAN_SHARE:.0%}, this page's reading of issue 19's "
            "\"no flags, or very few\")."]


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
    if (d / "flag_count.json").exists():
        lines += clean_lines(json.loads((d / "flag_count.json").read_text()))
    if (d / "paper.json").exists():
        lines += ["", "### The paper's experiments", ""] + paper_lines(json.loads((d / "paper.json").read_text()))
    lines += ["", "Generated by `python benchmarks/summarize.py` from the tables below."]
    (d / "benchmarks_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
