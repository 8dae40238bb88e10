"""HYDRA against its peers on the same data, model, training recipe and seeds, in one process.

For each setting of benchmarks/settings.py: HydraLabelCleaner with its
defaults (``scoring="memorisation_weighted"``, ``drop_fraction="auto"``); the paper's
C(i) from the same fit, flagging its k lowest (k = the true number of flips);
the cluster strategy; cleanlab (5-fold out-of-sample probabilities of the same
model and loop; its own ``find_label_issues`` flags); AUM (the ``aum``
package over one ordinary run; flags by its threshold samples, two more runs);
ranking by the final training loss; influence functions (LiSSA) and TracInCP. Reports AUROC against
the noise mask, precision at k, F1 and Jaccard of each method's flags (ranking
methods flag their k lowest), wall time and peak memory as ratios to one plain
training run measured in the same process, and the test accuracy of the same
model retrained from scratch on the kept samples with their noisy labels for
the same number of steps (mean ± sd over seeds). It also scores every variant
of benchmarks/score_ablation.py on the same runs.

    python benchmarks/suite.py --dataset digits          # every digits setting
    python benchmarks/suite.py --settings fashion-pairs  # one setting
    python benchmarks/suite.py --dataset fashion --device cuda
    python benchmarks/suite.py --smoke                   # every method and setting kind at tiny size
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import sklearn
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Meter  # noqa: E402
from methods import (  # noqa: E402
    OPTIMIZERS,
    Training,
    aum_threshold_flags,
    cleanlab_scores,
    influence_scores,
    init_module,
    one_run_scores,
    replay_statistics,
    tracin_scores,
    train_with_checkpoints,
    training_loss_scores,
)
from score_ablation import evaluate  # noqa: E402
from settings import SETTINGS, load_data  # noqa: E402

from hydraclean import HydraLabelCleaner  # noqa: E402
from hydraclean.evaluation import detection_metrics, retrain_accuracy  # noqa: E402
from hydraclean.gradients import without_second_derivative  # noqa: E402

N_CLUSTER_FEATURES = 500
DEFAULT = "HYDRA default"
PAPER = "HYDRA C(i), paper"


#: Peers without a flag rule of their own, from the ordinary run's record (each flags its k lowest, as the
#: other ranking methods do)
ONE_RUN = ("forgetting events", "Cartography confidence")
PEERS = ("cleanlab", "AUM", *ONE_RUN, "training loss", "influence (LiSSA)", "TracInCP")


def run_setting(name: str, device: torch.device, seeds: int, smoke: bool, log, peers: dict | None = None):
    """One setting: (results for the JSON, the arrays every ablation variant is computed from).

    With ``peers`` (this setting's results from an earlier run of the same
    command), the peer methods it has are not run again: their rows are copied.
    Peers it lacks (it predates them) are run.
    """
    setting = SETTINGS[name]
    make_module, recipe, X_tr, y_clean, X_val, y_val, X_test, y_test = load_data(setting, smoke)
    y_noisy, noise = setting.make_noise(y_clean, X_tr)
    k = int(noise.sum())
    Xt, yt = torch.as_tensor(X_tr, device=device), torch.as_tensor(y_noisy, device=device)
    Xv, yv = torch.as_tensor(X_val, device=device), torch.as_tensor(y_val, device=device)
    n_steps = recipe.max_epochs * -(-len(y_noisy) // recipe.batch_size)
    rows: dict[str, dict] = {}
    log(f"{name}: {k} of {len(y_noisy)} labels flipped")

    # one untimed epoch first, so that torch's one-off start-up costs do not land on the baseline
    train_with_checkpoints(make_module, Xt, yt, replace(recipe, max_epochs=1), seed=0)
    with Meter() as plain:
        model, checkpoints, lrs = train_with_checkpoints(make_module, Xt, yt, recipe, seed=0)
    base = {"seconds": plain.seconds, "peak_mib": plain.peak}
    log(f"  plain training {plain.seconds:.1f} s")

    def record(method, meter, scores, flags=None, extra_seconds=0.0):
        if flags is None:  # ranking methods flag their k lowest
            flags = np.zeros(len(scores), bool)
            flags[np.argsort(scores, kind="stable")[:k]] = True
        m = detection_metrics(noise, scores, flags)
        seconds = meter.seconds + extra_seconds
        rows[method] = {**m, "seconds": seconds, "time_ratio": seconds / plain.seconds, "peak_mib": meter.peak,
                        "memory_ratio": meter.peak / max(plain.peak, 1.0), "flags": flags}
        log(f"  {method:18s} AUROC {m['auroc']:.3f} P@k {m['precision_at_k']:.3f} F1 {m['f1']:.3f} "
            f"flagged {m['n_flagged']} ({seconds:.1f} s, {seconds / plain.seconds:.1f}x)")

    def cleaner(**params):
        return HydraLabelCleaner(init_module(make_module, 0), random_state=0, device=device,
                                 **recipe.as_params(), **params)

    with Meter() as m:
        default = cleaner().fit(X_tr, y_noisy, X_val=X_val, y_val=y_val)
    record(DEFAULT, m, default.label_quality_, default.label_issues_)
    record(PAPER, m, default.contribution_)
    with Meter() as m:
        clustered = cleaner(strategy="cluster", n_val_features=min(N_CLUSTER_FEATURES, len(y_val))).fit(
            X_tr, y_noisy, X_val=X_val, y_val=y_val)
    record("HYDRA cluster", m, clustered.label_quality_, clustered.label_issues_)
    with Meter() as m:
        final_loss = training_loss_scores(model, Xt, yt)
    def missing(*methods):  # a peer to run: no earlier run, or one from before the peer joined the suite
        return peers is None or any(m not in peers["methods"] for m in methods)

    if missing("training loss"):
        record("training loss", m, final_loss, extra_seconds=plain.seconds)
    if missing("cleanlab"):
        with Meter() as m:
            scores, flags = cleanlab_scores(make_module, Xt, yt, recipe, seed=0)
        record("cleanlab", m, scores, flags)
    if missing("AUM", *ONE_RUN):
        with Meter() as one_run:  # the ordinary run's own record: AUM, forgetting events, Cartography
            scores = one_run_scores(init_module(make_module, 0, device), Xt, yt, recipe, seed=0)
        with Meter() as m:
            flags = aum_threshold_flags(make_module, Xt, yt, recipe, seed=0)
        record("AUM", m, scores["AUM"], flags, extra_seconds=one_run.seconds)
        for method in ONE_RUN:
            record(method, one_run, scores[method])
    if missing("influence (LiSSA)", "TracInCP"):
        if without_second_derivative(model):  # LiSSA iterates Hessian-vector products
            log(f"  influence (LiSSA)  n/a: no second derivative of {', '.join(without_second_derivative(model))}")
        else:
            with Meter() as m:
                scores = influence_scores(model, Xt, yt, Xv, yv, depth=5 if smoke else 1000, seed=0)
            record("influence (LiSSA)", m, scores, extra_seconds=plain.seconds)
        with Meter() as m:
            scores = tracin_scores(make_module, checkpoints, lrs, Xt, yt, Xv, yv)
        record("TracInCP", m, scores, extra_seconds=plain.seconds)

    self_influence, weighted_loss = replay_statistics(default)
    arrays = {
        "contribution": default.contribution_, "class_contribution": default.class_contribution_,
        "labels": np.searchsorted(default.classes_, y_noisy), "trajectory_loss": default.trajectory_loss_,
        "trajectory_proba": default.trajectory_proba_, "trajectory_logit_margin": default.trajectory_logit_margin_,
        "contribution_matrix": clustered.contribution_matrix_,
        "feature_labels": np.searchsorted(clustered.classes_, y_val[clustered.val_feature_indices_]),
        "final_loss": -final_loss, "self_influence": self_influence, "weighted_trajectory_loss": weighted_loss,
        "valid_accuracy": np.asarray(default.history_["valid_accuracy"]),
        "n_val": np.int64(len(y_val)),
        "train_accuracy": np.float64(default.history_["train_accuracy"][-1]),
    }
    ablation = evaluate(arrays, noise)
    suggested = default.suggested_label_[noise]
    ablation["suggested_is_true_label"] = float((suggested == y_clean[noise]).mean())
    ablation["train_accuracy"] = default.history_["train_accuracy"][-1]

    def accuracy(keep, labels):
        if not keep.any():  # a method that flagged every sample (AUM's threshold rule can): nothing to retrain on
            return float("nan"), float("nan")
        accs = [retrain_accuracy(make_module, X_tr[keep], labels[keep], X_test, y_test, n_steps=n_steps,
                                 batch_size=recipe.batch_size, optimizer=OPTIMIZERS[recipe.optimizer], lr=recipe.lr,
                                 momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                 total_decay=recipe.decay ** recipe.max_epochs,
                                 lr_schedule="cosine" if recipe.cosine else None, seed=s, device=device)
                for s in range(seeds)]
        return float(np.mean(accs)), float(np.std(accs))

    everyone = np.ones(len(y_noisy), bool)
    rows["no cleaning"] = {"retrain": accuracy(everyone, y_noisy)}
    rows["oracle (drop the flipped)"] = {"retrain": accuracy(~noise, y_noisy)}
    for method in [r for r in rows if "flags" in rows[r]]:
        rows[method]["retrain"] = accuracy(~rows[method]["flags"], y_noisy)
    for r in rows.values():
        r.pop("flags", None)
    if peers is not None:
        rows.update({p: peers["methods"][p] for p in PEERS if p in peers["methods"] and p not in rows})
    log("  retraining done (" + ", ".join(f"{n}: {r['retrain'][0]:.3f}" for n, r in rows.items()) + ")")
    arrays.pop("contribution_matrix")  # large; the rest lets a later choice be re-evaluated offline
    arrays.update(noise=noise, y_clean=y_clean)
    return {"setting": name, "title": setting.title, "n_flipped": k, "n_train": len(y_noisy),
            "n_val": len(y_val), "n_test": len(y_test),
            "model": getattr(getattr(make_module, "func", make_module), "__name__", "MLP"),
            "recipe": recipe.__dict__, "plain": base, "methods": rows, "ablation": ablation,
            "peers_from_earlier_run": peers is not None}, arrays


def markdown(results: list[dict], header: str) -> str:
    cols = ["method", "AUROC", "P@k", "flagged", "F1", "Jaccard", "retrain acc (noisy labels)", "time s",
            "time x plain", "peak MiB"]
    out = [header]
    for res in results:
        out += ["", f"**{res['title']}** ({res['n_flipped']} of {res['n_train']} labels flipped; {res['model']}, "
                f"{Training(**res['recipe']).describe()}; "
                f"final training accuracy {res['ablation']['train_accuracy']:.3f}; "
                f"plain training {res['plain']['seconds']:.1f} s)", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for name, r in res["methods"].items():
            acc = f"{r['retrain'][0]:.3f} ± {r['retrain'][1]:.3f}"
            cells = [name] + ([f"{r['auroc']:.3f}", f"{r['precision_at_k']:.3f}", str(r["n_flagged"]), f"{r['f1']:.3f}",
                               f"{r['jaccard']:.3f}", acc, f"{r['seconds']:.1f}", f"{r['time_ratio']:.2f}",
                               f"{r['peak_mib']:.0f}"] if "auroc" in r else ["", "", "", "", "", acc, "", "", ""])
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "fashion", "topics", "tabular"])
    parser.add_argument("--settings", nargs="+", default=[], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="every method at tiny size")
    parser.add_argument("--out", help="markdown output (a .json with every number, and the arrays as .npz, beside it)")
    parser.add_argument("--peers-from", help="a JSON of an earlier run: copy the peers' rows instead of running them")
    args = parser.parse_args()
    names = args.settings or [n for n in SETTINGS if n.startswith(args.dataset or "")]
    if args.smoke:
        args.seeds = 1
        names = args.settings or ["digits-sym-0.2", "digits-pairs", "digits-cc", "digits-memorise",
                                  "digits-memorise-perm", "digits-instance", "digits-adamw-sym-0.4",
                                  "digits-resnet-sym-0.4", "fashion-instance",
                                  "topics-sym-0.2", "topics-bag-sym-0.4", "tabular-cc"]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    device = torch.device(args.device)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    earlier = {r["setting"]: r for r in json.loads(Path(args.peers_from).read_text())} if args.peers_from else {}
    runs = [run_setting(n, device, args.seeds, args.smoke, log, earlier.get(n)) for n in names]
    results = [r for r, _ in runs]
    total = time.perf_counter() - t0
    import cleanlab

    machine = (f"{torch.cuda.get_device_name(device)} (CUDA), " if device.type == "cuda" else "") + (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    header = (
        f"Command: `python benchmarks/suite.py {'--settings ' + ' '.join(names) if args.settings else '--dataset ' + str(args.dataset)}"
        f" --seeds {args.seeds}{' --device ' + args.device if args.device != 'cpu' else ''}"
        f"{' --smoke' if args.smoke else ''}`. Noise and model seed 0, retraining seeds 0..{args.seeds - 1}. "
        f"Machine: {machine}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, cleanlab {cleanlab.__version__}. Whole run: {total / 60:.1f} min. "
        "Times and peak memory above the starting point are also given as ratios to one plain training run "
        f"measured in the same process; training loss, influence functions and TracInCP include that run. "
        f"\"{PAPER}\" is the same fit as \"{DEFAULT}\", ranked by `contribution_`."
        + (f" The peers' rows ({', '.join(PEERS)}) are copied from an earlier run of the same command "
           f"(`--peers-from {Path(args.peers_from).name}`); a peer that run lacks is run here."
           if args.peers_from else "")
    )
    text = markdown(results, header)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
        np.savez_compressed(Path(args.out).with_suffix(".npz"),
                            **{f"{r['setting']}/{k}": v for r, a in runs for k, v in a.items()})


if __name__ == "__main__":
    main()
