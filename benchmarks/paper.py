"""The HYDRA paper's Fashion-MNIST experiments, scaled to 2 CPU cores (scale stated in the output).

* Table 4: 50% symmetric noise; per class, the sign vectors of C(i, j) over the
  validation features are split in two; Jaccard overlap of the "correct" and
  "random" groups with the truth, averaged over classes. HYDRA with 1,000 and
  with 100 features; influence functions (LiSSA, all 100 H^-1 g_j solved
  together) with 100.
* Figures 3-5: a tracked subset followed through training with the exact
  (Hessian-aware) and the Hessian-free recursion in the same run; after each
  epoch, the mean norm of the hypergradient difference, and the sign-error rate
  and Spearman correlation of free-mode C(i) and of influence functions (LiSSA
  at that epoch's weights) against exact C(i).
* Figure 2: inter-class contribution heatmap from clean labels.

Table 3 is in benchmarks/suite.py (noise 0.8, drop 80%).

    python benchmarks/paper.py [--smoke] [--out-dir docs/_generated]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import CE, influence_scores, lissa, safe_lissa_settings  # noqa: E402
from settings import ensure_fashion_mnist  # noqa: E402

from hydraclean import HydraLabelCleaner  # noqa: E402
from hydraclean.cleaning import flag_sign_clusters  # noqa: E402
from hydraclean.contribution import inter_class_contribution  # noqa: E402
from hydraclean.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, make_label_noise  # noqa: E402
from hydraclean.gradients import PerSampleLoss, parameter_dict, per_sample_gradients, validation_gradients  # noqa: E402
from hydraclean.hypergradient import ExactTracker  # noqa: E402
from hydraclean.models import LeNet5  # noqa: E402
from hydraclean.training import plan_trajectory, train  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PAPER = {
    "table4": {"HYDRA": (0.7806, 0.7773), "influence functions": (0.4126, 0.3322)},
    "fig": {"HYDRA": (0.014, 0.986), "influence functions": (0.130, 0.820), "error_norm": 0.74},
}


def data(n_train: int, n_val: int, seed: int = 0):
    X, y = load_fashion_mnist(split="train")
    X_te, y_te = load_fashion_mnist(split="test")
    rng = np.random.RandomState(seed)
    tr = rng.permutation(len(y))[:n_train]
    val = rng.permutation(len(y_te))[:n_val]
    return X[tr], y[tr], X_te[val], y_te[val]


def class_jaccard(noise, flagged, labels):
    out = {"correct": [], "random": []}
    for c in np.unique(labels):
        m = labels == c
        for name, truth, found in (("correct", ~noise[m], ~flagged[m]), ("random", noise[m], flagged[m])):
            union = (truth | found).sum()
            out[name].append((truth & found).sum() / union if union else 1.0)
    return float(np.mean(out["correct"])), float(np.mean(out["random"]))


def table4(n_train, epochs, smoke, log):
    X, y, Xv, yv = data(n_train, 1000)
    y_noisy, noise = make_label_noise(y, 0.5, random_state=0)
    recipe = dict(max_epochs=epochs, batch_size=64, lr=0.01, momentum=0.9)
    rows = {}
    for m in (100, 1000):
        t0 = time.perf_counter()
        c = HydraLabelCleaner(LeNet5, strategy="cluster", scoring="contribution", n_val_features=m, random_state=0,
                              **recipe)
        c.fit(X, y_noisy, X_val=Xv, y_val=yv)
        rows[f"HYDRA, {m} features"] = (*class_jaccard(noise, c.label_issues_, y_noisy), time.perf_counter() - t0)
        log(f"  table 4, HYDRA {m}: {rows[f'HYDRA, {m} features']}")
    # influence functions at the same final weights, 100 features
    t0 = time.perf_counter()
    model = c.module_
    feats = np.sort(np.random.RandomState(0).choice(len(yv), 100, replace=False))
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y_noisy)
    _, G = validation_gradients(model, torch.as_tensor(Xv), torch.as_tensor(yv), CE, rows=torch.as_tensor(feats))
    loss = PerSampleLoss(model, CE)
    damping, scale = safe_lissa_settings(loss, parameter_dict(model), Xt, yt)
    S = lissa(loss, parameter_dict(model), Xt, yt, G, damping=damping, scale=scale, depth=10 if smoke else 100, seed=0)
    C = torch.cat([per_sample_gradients(loss, parameter_dict(model), Xt[s : s + 256], yt[s : s + 256]) @ S.T
                   for s in range(0, len(yt), 256)]).double().numpy() / len(yt)
    flags = flag_sign_clusters(C, y_noisy, C.mean(1))
    rows["influence functions (LiSSA), 100 features"] = (*class_jaccard(noise, flags, y_noisy), time.perf_counter() - t0)
    log(f"  table 4, IF: {rows['influence functions (LiSSA), 100 features']}")
    return rows


def figures_3_5(n_train, n_tracked, epochs, smoke, log):
    X, y, Xv, yv = data(n_train, 1000, seed=1)
    Xt, yt, Xvt, yvt = (torch.as_tensor(a) for a in (X, y, Xv, yv))
    tracked = torch.as_tensor(np.concatenate([np.flatnonzero(y == c)[: n_tracked // 10] for c in range(10)]))
    torch.manual_seed(0)
    module = LeNet5()
    traj = plan_trajectory(len(y), batch_size=64, max_epochs=epochs, lr=0.01, lr_schedule="constant", momentum=0.9,
                           weight_decay=0.0, seed=0)
    exact = ExactTracker(module, CE, traj, tracked, chunk_size=25)
    free = ExactTracker(module, CE, traj, tracked, with_hessian=False)
    steps = -(-len(y) // 64)
    curves = {"epoch": [], "error_norm": [], "HYDRA": [], "influence functions": []}
    state = {}


    def measure(model):  # after an epoch's last step: contributions as if training ended here
        g, _ = validation_gradients(model, Xvt, yvt, CE)
        c_exact = -(exact.nabla @ g).double().numpy() / len(y)
        c_free = -(free.nabla @ g).double().numpy() / len(y)
        c_if = influence_scores(model, Xt, yt, Xvt, yvt, depth=10 if smoke else 200, seed=0)[tracked.numpy()]
        curves["epoch"].append(state.pop("pending"))
        curves["error_norm"].append(float((exact.nabla - free.nabla).norm(dim=1).mean()))
        for name, c in (("HYDRA", c_free), ("influence functions", c_if)):
            curves[name].append((float(np.mean(np.sign(c) != np.sign(c_exact))), float(spearmanr(c, c_exact)[0])))
        log(f"  epoch {curves['epoch'][-1]}: error {curves['error_norm'][-1]:.3g}, HYDRA {curves['HYDRA'][-1]}, "
            f"IF {curves['influence functions'][-1]}")

    class Epochs:
        """Both trackers; step t is recorded at w_{t-1}, so the state after epoch e is measured at the first
        step of epoch e + 1, and after the last epoch on the trained model."""

        def attach(self, model):
            self.model = model

        def detach(self):
            pass

        def record(self, step):
            if "pending" in state:
                measure(self.model)
            exact.record(step)
            free.record(step)
            if (step.t + 1) % steps == 0:
                state["pending"] = (step.t + 1) // steps

    model, _, _ = train(module, Xt, yt, CE, traj, recorder=Epochs())
    measure(model)
    return curves


def plot_curves(curves, path):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    axes[0].plot(curves["epoch"], curves["error_norm"], marker="o")
    axes[0].set(title="Fig. 3: mean ||nabla_exact - nabla_free||", xlabel="epoch")
    for k, (title, idx) in enumerate((("Fig. 4: sign-error rate vs exact", 0), ("Fig. 5: Spearman vs exact", 1))):
        for name in ("HYDRA", "influence functions"):
            axes[k + 1].plot(curves["epoch"], [v[idx] for v in curves[name]], marker="o", label=name)
            axes[k + 1].axhline(PAPER["fig"][name][idx], ls="--", lw=0.8,
                                color="C0" if name == "HYDRA" else "C1", label=f"paper, {name}")
        axes[k + 1].set(title=title, xlabel="epoch")
        axes[k + 1].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def figure_2(n_train, epochs, path, log):
    from hydraclean.plotting import plot_inter_class

    X, y, Xv, yv = data(n_train, 1000, seed=2)
    c = HydraLabelCleaner(LeNet5, strategy="cluster", scoring="contribution", n_val_features=1000, max_epochs=epochs,
                          batch_size=64, lr=0.01, random_state=0).fit(X, y, X_val=Xv, y_val=yv)
    heat = inter_class_contribution(c.contribution_matrix_, y, yv[c.val_feature_indices_])
    plot_inter_class(heat, FASHION_MNIST_CLASSES, title="Fashion-MNIST, clean labels").savefig(path, dpi=110)
    log(f"  figure 2 written; diagonal share {np.abs(np.diag(heat)).sum() / np.abs(heat).sum():.2f}")
    return heat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default="docs/_generated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", UserWarning)
    ensure_fashion_mnist()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    scale = dict(t4=(600, 2), fig=(300, 20, 2), f2=(500, 2)) if args.smoke else dict(
        t4=(10_000, 20), fig=(2_000, 100, 10), f2=(5_000, 10))
    t0 = time.perf_counter()
    t4 = table4(*scale["t4"], args.smoke, log)
    curves = figures_3_5(*scale["fig"], args.smoke, log)
    plot_curves(curves, out / "paper_figures_3_5.png")
    figure_2(*scale["f2"], out / "paper_figure_2.png", log)
    minutes = (time.perf_counter() - t0) / 60
    lines = [
        f"Command: `python benchmarks/paper.py{' --smoke' if args.smoke else ''}`; seeds 0; torch {torch.__version__}; "
        f"2 CPU threads; whole run {minutes:.1f} min.", "",
        f"**Table 4** (50% symmetric noise; LeNet-5, {scale['t4'][0]} training samples, {scale['t4'][1]} epochs, "
        "SGD lr 0.01, momentum 0.9, batch 64; the paper: 60,000 samples). Jaccard overlap averaged over classes.", "",
        "| method | correct labels | random labels | time (s) |", "|---|---|---|---|",
    ]
    for name, (a, b, sec) in t4.items():
        lines.append(f"| {name} | {a:.4f} | {b:.4f} | {sec:.0f} |")
    for name, (a, b) in PAPER["table4"].items():
        lines.append(f"| paper: {name} (1,000 features) | {a:.4f} | {b:.4f} | |")
    last = {k: curves[k][-1] for k in ("HYDRA", "influence functions")}
    lines += [
        "", f"**Figures 3-5** ({scale['fig'][1]} tracked samples, {scale['fig'][1] // 10} per class, of "
        f"{scale['fig'][0]} training samples; {scale['fig'][2]} epochs; the paper: 500 of 60,000, 200 epochs). "
        "After the last epoch:", "",
        "| method | sign-error rate vs exact | Spearman vs exact |", "|---|---|---|",
        f"| HYDRA (Hessian-free) | {last['HYDRA'][0]:.3f} | {last['HYDRA'][1]:.3f} |",
        f"| influence functions (LiSSA) | {last['influence functions'][0]:.3f} | {last['influence functions'][1]:.3f} |",
        f"| paper: HYDRA | {PAPER['fig']['HYDRA'][0]} | {PAPER['fig']['HYDRA'][1]} |",
        f"| paper: influence functions | {PAPER['fig']['influence functions'][0]} | "
        f"{PAPER['fig']['influence functions'][1]} |",
        "", f"Mean hypergradient difference norm after the last epoch: {curves['error_norm'][-1]:.3g} (the paper: "
        f"stabilises at {PAPER['fig']['error_norm']} after about 70 of 200 epochs).", "",
        "![Figures 3-5](_generated/paper_figures_3_5.png)", "",
        f"**Figure 2** (clean labels, {scale['f2'][0]} training samples, {scale['f2'][1]} epochs, 1,000 validation "
        "features; rows: training class, columns: validation class):", "",
        "![Figure 2](_generated/paper_figure_2.png)",
    ]
    text = "\n".join(lines)
    print(text)
    (out / "paper.md").write_text(text + "\n")
    (out / "paper.json").write_text(json.dumps({"table4": t4, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
