"""Digits benchmark (scikit-learn's bundled 8x8 digits): quality, OOD, criteria, robustness.

    python benchmarks/digits.py                       # all four parts, 3 seeds
    python benchmarks/digits.py --parts a --seeds 1 --steps 300    # a quick look

Parts (an MLP 64-100-10 and a small CNN; Normal(0, 1) priors; Adam; MC-averaged predictive):
  a  accuracy, NLL, ECE, Brier of a deterministic network, dense VI and SSVI at densities
     0.5, 0.2, 0.1, 0.05 (mean +- std over seeds), and a plot of each metric against density
  b  out-of-distribution detection: train on classes 0-4, score classes 5-9 as OOD by
     predictive entropy and by mutual information (AUROC, AUPR)
  c  the six removal criteria and both addition rules at density 0.1 (MLP)
  d  robustness to the initial scale: init_scale in {1e-4, 1e-3, 1e-2, 1e-1} for dense VI and
     SSVI at density 0.1 (MLP)
Writes results/digits.{md,json,png}.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, add_optimizer_reset_flag, markdown_table, mean_std, pyplot, run_parallel, save_figure, write_results  # noqa: E402

METHODS = [("deterministic", None), ("dense VI", 1.0), ("SSVI 0.5", 0.5), ("SSVI 0.2", 0.2), ("SSVI 0.1", 0.1), ("SSVI 0.05", 0.05)]
REMOVALS = ["abs_mean", "snr", "abs_expectation", "snr_abs", "exp_abs", "snr_exp_abs"]
INIT_SCALES = [1e-4, 1e-3, 1e-2, 1e-1]


def data(classes=None):
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    n_test = 360
    xtr, ytr, xte, yte = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
    if classes is None:
        return xtr, ytr, xte, yte, None, None
    keep_tr, keep_te = ytr < classes, yte < classes
    return xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te], xte[~keep_te], yte[~keep_te]


def make_net(arch, num_classes):
    import torch.nn as nn

    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, num_classes))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(-3), nn.Linear(32 * 4 * 4, num_classes),  # flatten C, H, W only: works with particle dims too
    )


def fit(task):
    import pyro
    import torch

    from pyro_ssvi import SSVI, SparseSubspaceGuide
    from pyro_ssvi.metrics import classification_metrics, mc_predict, ood_report
    from pyro_ssvi.models import BayesianClassifier, bayesianize

    part, arch, method, density, seed, opts, args = task
    classes = 5 if part == "b" else None
    xtr, ytr, xte, yte, xood, _ = data(classes)
    num_classes = 5 if classes else 10
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    steps = args.steps if arch == "mlp" else args.cnn_steps
    n = len(xtr)
    batches = [torch.randint(0, n, (args.batch_size,)) for _ in range(steps)]
    if density is None:  # deterministic network, cross-entropy + weight decay
        net = make_net(arch, num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-4)
        for idx in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            sample_probs = net(xte).softmax(-1).unsqueeze(0)
            ood_probs = net(xood).softmax(-1).unsqueeze(0) if xood is not None else None
        active = dense = sum(p.numel() for p in net.parameters() if p.dim() > 1)
    else:
        model = BayesianClassifier(bayesianize(make_net(arch, num_classes)), num_data=n)
        # as in the reference recipe, the CNN's first convolution (16 x 1 x 3 x 3) stays dense
        dense_sites = ("net.1.weight",) if arch == "cnn" and density < 1 else ()
        guide = SparseSubspaceGuide(model, density=density, dense_sites=dense_sites, init_scale=opts.get("init_scale", (6e-4, 5e-4)))
        svi = SSVI(
            model, guide, pyro.optim.Adam({"lr": args.lr}), pyro.infer.TraceMeanField_ELBO(), total_steps=steps,
            update_every=args.update_every, removal=opts.get("removal", "snr_abs"), addition=opts.get("addition", "gradient"),
            optimizer_reset=args.optimizer_reset,
        )
        for idx in batches:
            svi.step(xtr[idx], ytr[idx])
        sample_probs = mc_predict(model, guide, xte, num_samples=args.mc_samples).softmax(-1)
        ood_probs = mc_predict(model, guide, xood, num_samples=args.mc_samples).softmax(-1) if xood is not None else None
        active, dense = guide.active_params, guide.dense_params
    probs = sample_probs.mean(0)
    out = {
        "part": part, "arch": arch, "method": method, "density": density, "seed": seed, **opts,
        **classification_metrics(probs, yte),
        "active_params": active, "dense_params": dense,
    }
    if ood_probs is not None:  # a deterministic net has one draw: entropy only
        for score, metrics in ood_report(sample_probs, ood_probs).items():
            prefix = {"entropy": "entropy", "mutual_information": "mi"}[score]
            out.update({f"{prefix}_{k}": v for k, v in metrics.items()})
    return out


def tasks_for(args):
    seeds = range(args.seeds)
    tasks = []
    if "a" in args.parts:
        tasks += [("a", arch, m, d, s, {}, args) for arch in ("mlp", "cnn") for m, d in METHODS for s in seeds]
    if "b" in args.parts:
        tasks += [("b", arch, m, d, s, {}, args) for arch in ("mlp", "cnn") for m, d in METHODS for s in seeds]
    if "c" in args.parts:
        tasks += [("c", "mlp", f"removal {r}", 0.1, s, {"removal": r}, args) for r in REMOVALS for s in seeds]
        tasks += [("c", "mlp", "addition random", 0.1, s, {"addition": "random"}, args) for s in seeds]
    if "d" in args.parts:
        tasks += [("d", "mlp", m, d, s, {"init_scale": i}, args) for i in INIT_SCALES for m, d in (("dense VI", 1.0), ("SSVI 0.1", 0.1)) for s in seeds]
    # longest first keeps both workers busy to the end
    return sorted(tasks, key=lambda t: t[1] != "cnn")


def fmt(runs, key):
    m, sd = mean_std(r[key] for r in runs)
    return f"{m:.4f} ± {sd:.4f}" if sd == sd else f"{m:.4f}"


def report(args, runs):
    md = ["# Digits: dense VI vs SSVI\n"]
    md.append(
        f"scikit-learn digits, 1437 training / 360 test images; Normal(0, 1) priors; {args.steps} (MLP) / {args.cnn_steps} (CNN) "
        f"Adam steps (lr {args.lr}, optimizer_reset {args.optimizer_reset}) on minibatches of {args.batch_size}; MC-averaged predictive over {args.mc_samples} samples; "
        f"mean ± std over {args.seeds} seeds. The deterministic network is trained with cross-entropy and weight decay 1e-4. "
        "MLP: 64-100-10, every weight sparse. CNN: conv 1-16 3x3, conv 16-32 3x3, 2x2 average pool, linear 512-10; "
        "its first convolution stays dense, as in the reference recipe.\n"
    )
    sel = lambda part, **kw: [r for r in runs if r["part"] == part and all(r.get(k) == v for k, v in kw.items())]  # noqa: E731
    if "a" in args.parts:
        md.append("## (a) Quality against density\n")
        rows = []
        for arch in ("mlp", "cnn"):
            for m, _ in METHODS:
                rs = sel("a", arch=arch, method=m)
                rows.append([arch.upper(), m, f"{rs[0]['active_params']}/{rs[0]['dense_params']}"] + [fmt(rs, k) for k in ("accuracy", "nll", "ece", "brier")])
        md.append(markdown_table(["net", "method", "active / dense weights", "accuracy", "NLL", "ECE", "Brier"], rows) + "\n")
    if "b" in args.parts:
        md.append("## (b) OOD detection: trained on digits 0-4, digits 5-9 are out of distribution\n")
        rows = []
        for arch in ("mlp", "cnn"):
            for m, d in METHODS:
                rs = sel("b", arch=arch, method=m)
                mi = [fmt(rs, "mi_auroc"), fmt(rs, "mi_aupr")] if d is not None else ["n/a", "n/a"]
                rows.append([arch.upper(), m, fmt(rs, "accuracy"), fmt(rs, "entropy_auroc"), fmt(rs, "entropy_aupr")] + mi)
        md.append(markdown_table(["net", "method", "in-dist. accuracy", "AUROC (entropy)", "AUPR (entropy)", "AUROC (MI)", "AUPR (MI)"], rows) + "\n")
    if "c" in args.parts:
        md.append("## (c) Removal and addition criteria at density 0.1 (MLP)\n")
        rows = []
        for m in [f"removal {r}" for r in REMOVALS] + ["addition random"]:
            rs = sel("c", method=m)
            label = m.replace("removal ", "") + (" + gradient addition" if m.startswith("removal") else " (snr_abs removal)")
            rows.append([label] + [fmt(rs, k) for k in ("accuracy", "nll", "ece")])
        md.append(markdown_table(["criteria", "accuracy", "NLL", "ECE"], rows) + "\n")
    if "d" in args.parts:
        md.append("## (d) Robustness to the initial scale (MLP)\n")
        rows = []
        for i in INIT_SCALES:
            row = [f"{i:g}"]
            for m in ("dense VI", "SSVI 0.1"):
                rs = sel("d", method=m, init_scale=i)
                row += [fmt(rs, "accuracy"), fmt(rs, "nll")]
            rows.append(row)
        md.append(markdown_table(["init scale", "dense VI accuracy", "dense VI NLL", "SSVI 0.1 accuracy", "SSVI 0.1 NLL"], rows) + "\n")
    return "\n".join(md)


def plot(args, runs):
    plt = pyplot()

    keys = ("accuracy", "nll", "ece", "brier")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    for arch, color in (("mlp", "C0"), ("cnn", "C1")):
        dens = [d for _, d in METHODS if d is not None]
        for ax, key in zip(axes, keys):
            pts = [mean_std(r[key] for r in runs if r["part"] == "a" and r["arch"] == arch and r["density"] == d) for d in dens]
            ax.errorbar(dens, [p[0] for p in pts], yerr=[p[1] for p in pts], marker="o", capsize=3, color=color, label=f"{arch.upper()} (SSVI; 1.0 = dense VI)")
            det = mean_std(r[key] for r in runs if r["part"] == "a" and r["arch"] == arch and r["density"] is None)
            ax.axhline(det[0], color=color, ls="--", lw=1, label=f"{arch.upper()} deterministic")
            ax.set_xscale("log")
            ax.set_xlabel("density")
            ax.set_title(key)
    axes[0].legend(fontsize=7)
    save_figure(fig, args, "digits")


def parse_args(argv):
    p = ArgumentParser(description="Digits benchmark: dense VI vs SSVI.")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ab'")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000, help="SVI steps of the MLP")
    p.add_argument("--cnn-steps", type=int, default=1500, help="SVI steps of the CNN")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--mc-samples", type=int, default=20)
    add_common_flags(p)
    add_optimizer_reset_flag(p)
    args = p.parse_args(argv)
    if not args.parts or set(args.parts) - set("abcd"):
        p.error(f"--parts: expected letters among a, b, c, d, got {args.parts!r}")
    if args.seeds < 1 or args.steps < 1 or args.cnn_steps < 1:
        p.error("--seeds, --steps and --cnn-steps must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = run_parallel(fit, tasks_for(args), args.workers, "digits fits")
    md = report(args, runs)
    if "a" in args.parts:
        plot(args, runs)
    write_results("digits", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    run_main(main)
