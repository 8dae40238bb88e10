"""Write the summary at the top of docs/benchmarks.md from the suites' and the paper script's JSON.

Every number in the summary comes from those files; the wording states where
HYDRA wins and where it loses.

    python benchmarks/summarize.py [--dir docs/_generated]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HYDRA = ("HYDRA drop", "HYDRA cluster")


def suite_lines(name: str, results: list[dict]) -> list[str]:
    lines = []
    for res in results:
        methods = {k: v for k, v in res["methods"].items() if "auroc" in v}
        ranked = sorted(methods, key=lambda k: -methods[k]["auroc"])
        best = ranked[0]
        hydra = methods["HYDRA drop"]
        rank = ranked.index("HYDRA drop") + 1 - (ranked.index("HYDRA cluster") < ranked.index("HYDRA drop"))
        peers = [m for m in ranked if m not in HYDRA]
        beaten_by = [m for m in peers if methods[m]["auroc"] > hydra["auroc"]]
        retrain = {k: v["retrain"][0] for k, v in res["methods"].items()}
        best_retrain = max((k for k in retrain if not k.startswith("oracle")), key=retrain.get)
        verdict = (
            f"HYDRA's scores rank first of {len(peers) + 1} methods by AUROC ({hydra['auroc']:.3f})"
            if not beaten_by else
            f"HYDRA ranks {rank} of {len(peers) + 1} by AUROC ({hydra['auroc']:.3f}); it loses to "
            + ", ".join(f"{m} ({methods[m]['auroc']:.3f})" for m in beaten_by)
        )
        lines.append(
            f"- **{name}, noise {res['rate']}**: {verdict}. Best AUROC: {best} ({methods[best]['auroc']:.3f}). "
            f"Retraining on HYDRA drop's kept samples gives {retrain['HYDRA drop']:.3f} test accuracy against "
            f"{retrain['no cleaning']:.3f} without cleaning (best: {best_retrain}, {retrain[best_retrain]:.3f}; "
            f"dropping exactly the flipped samples: {retrain['oracle (drop the flipped)']:.3f}). HYDRA drop costs "
            f"{hydra['time_ratio']:.1f}x a plain training run; cleanlab {methods['cleanlab']['time_ratio']:.1f}x, "
            f"influence functions {methods['influence (LiSSA)']['time_ratio']:.1f}x, TracInCP "
            f"{methods['TracInCP']['time_ratio']:.1f}x (these three include the training run)."
        )
        if "retrain_true_labels" in res["methods"]["HYDRA drop"]:
            t = {k: v["retrain_true_labels"][0] for k, v in res["methods"].items() if "retrain_true_labels" in v}
            lines.append(
                f"  Paper Table 3 protocol with the kept samples' *true* labels (what the original code did): "
                + ", ".join(f"{k} {v:.3f}" for k, v in t.items())
                + ". With the noisy labels a user actually has: "
                + ", ".join(f"{k} {res['methods'][k]['retrain'][0]:.3f}" for k in t) + "."
            )
    return lines


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
    lines = ["## Summary", ""]
    for name, file in (("digits", "suite_digits.json"), ("Fashion-MNIST", "suite_fashion.json")):
        if (d / file).exists():
            lines += suite_lines(name, json.loads((d / file).read_text()))
    if (d / "paper.json").exists():
        lines += paper_lines(json.loads((d / "paper.json").read_text()))
    lines += ["", "Generated by `python benchmarks/summarize.py` from the tables below."]
    (d / "benchmarks_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
