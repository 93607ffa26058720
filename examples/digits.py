"""SSVI next to dense mean-field VI on scikit-learn's digits (runs offline in under a minute and a half).

    python examples/digits.py                      # density 0.1 (SSVI) and 1.0 (dense VI), 3 seeds
    python examples/digits.py --densities 0.05,0.2 --steps 5000 --seeds 5 --out results.json

Each run trains the same ``PyroModule`` MLP (64-100-10, Normal(0, 1) priors) with
:class:`pyro_ssvi.SSVI`; density 1.0 is dense VI through the very same code path. Every seed has
its own train/test split and initialisation, and the table shows mean ± sd over the seeds (one
seed's draw varies by a point or two of accuracy). Test metrics use the MC-averaged predictive
(``--mc-samples`` weight draws).
"""

import json
import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, SparseSubspaceGuide
from pyro_ssvi.scripts.cli import ArgumentParser, run_main
from pyro_ssvi.cost import guide_state_bytes
from pyro_ssvi.metrics import classification_report, mc_predict


class MLP(PyroModule):
    """64-100-10 BNN. ``num_data``: training-set size, so a minibatch's likelihood is scaled to it."""

    def __init__(self, hidden=100, prior_scale=1.0, num_data=None):
        super().__init__()
        self.num_data = num_data
        self.fc1 = PyroModule[torch.nn.Linear](64, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([hidden, 64]).to_event(2))
        self.fc2 = PyroModule[torch.nn.Linear](hidden, 10)
        self.fc2.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([10, hidden]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        # a subsampled plate scales the likelihood (only) by num_data / batch; the KL is counted once
        size = self.num_data or x.shape[0]
        with pyro.plate("data", size, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def load_digits_split(seed=0, test_fraction=0.2):
    """scikit-learn's bundled digits (1797 8x8 images), scaled to [0, 1], shuffled and split."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator("cpu").manual_seed(seed), device="cpu")
    n_test = int(round(test_fraction * len(X)))
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]


def fit(density, data, steps, lr, hidden, seed, batch_size=None, progress=True, **ssvi_kwargs):
    """Train one model; ``batch_size=None`` (or >= the training-set size) is full batch."""
    Xtr, ytr, Xte, yte = data
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    n = len(Xtr)
    full = batch_size is None or batch_size >= n
    model = MLP(hidden, num_data=n)
    guide = SparseSubspaceGuide(model, density=density)
    optim = pyro.optim.Adam({"lr": lr})
    svi = SSVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO(), total_steps=steps, **ssvi_kwargs)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"density {density:g}", disable=not progress, leave=False)
    for step in bar:
        idx = slice(None) if full else torch.randperm(n)[:batch_size]
        loss = svi.step(Xtr[idx], ytr[idx])
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.1f}")
    seconds = time.perf_counter() - start
    return model, guide, svi, optim, seconds


def evaluate(model, guide, X, y, mc_samples):
    """Metrics of the MC-averaged predictive, and its class probabilities."""
    logits = mc_predict(model, guide, X, num_samples=mc_samples)
    return classification_report(logits, y), logits.softmax(-1).mean(0)


def plot_reliability_diagrams(path, probs_by_density, y):
    """One reliability diagram per density, side by side, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_ssvi.scripts.plots import plot_reliability

    n = len(probs_by_density)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, (density, probs) in zip(axes[0], probs_by_density):
        plot_reliability(probs, y, ax=ax)
        ax.set_title(f"density {density:g}: " + ax.get_title())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    """The flags, each checked, and the output files found writable, before any data is loaded."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", default="0.1,1.0", help="comma-separated densities (1.0 = dense VI)")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps per density and seed (2000: the 3 seeds of both densities take about 80 s on 2 cores)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: full batch, every training image each step)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--mc-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="the first seed (split and initialisation)")
    p.add_argument("--seeds", type=int, default=3, help="seeds run one after another (--seed, --seed + 1, ...); the table shows mean ± sd")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="save reliability diagrams (one per density) to this image file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.densities = [float(d) for d in args.densities.split(",")]
    except ValueError:
        p.error(f"--densities: expected comma-separated numbers, got {args.densities!r}")
    if not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities: every density must lie in (0, 1], got {args.densities}")
    for name in ("steps", "batch_size", "hidden", "mc_samples", "seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr: expected a finite number > 0, got {args.lr}")
    if args.out:
        p.check_output_file("--out", args.out)
    if args.plot:
        p.check_image_file("--plot", args.plot)
    p.check_distinct_files([("--out", args.out), ("--plot", args.plot)])
    return args


def run_seed(args, seed):
    """Every density on the split and initialisation of ``seed``: ``(reports, [(density, probs)], test labels)``."""
    data = load_digits_split(seed)
    results, probs_by_density = [], []
    for density in args.densities:
        model, guide, svi, optim, seconds = fit(
            density, data, args.steps, args.lr, args.hidden, seed, args.batch_size, not args.no_progress
        )
        report, probs = evaluate(model, guide, data[2], data[3], args.mc_samples)
        probs_by_density.append((density, probs))
        report.update(
            density=density,
            seed=seed,
            active_params=guide.active_params,
            dense_params=guide.dense_params,
            guide_bytes=guide_state_bytes(guide, optim),
            seconds=seconds,
            updates=len(svi.history),
        )
        results.append(report)
    return results, probs_by_density, data[3]


METRICS = ("accuracy", "nll", "ece", "brier")


def summarise(results, densities):
    """Per density: the mean and standard deviation over seeds of each metric and of the seconds."""
    out = []
    for density in densities:
        rs = [r for r in results if r["density"] == density]
        row = {"density": density, "seeds": len(rs), "active_params": rs[0]["active_params"], "dense_params": rs[0]["dense_params"],
               "guide_bytes": rs[0]["guide_bytes"]}
        for key in (*METRICS, "seconds"):
            values = torch.tensor([float(r[key]) for r in rs], dtype=torch.float64)
            row[key] = values.mean().item()
            row[f"{key}_sd"] = values.std().item() if len(rs) > 1 else 0.0
        out.append(row)
    return out


def print_table(summary):
    seeds = summary[0]["seeds"]
    pm = (lambda r, k, d: f"{r[k]:.{d}f} ± {r[k + '_sd']:.{d}f}") if seeds > 1 else (lambda r, k, d: f"{r[k]:.{d}f}")
    width = 17 if seeds > 1 else 7
    print(f"{'density':>8} {'accuracy':>{width}} {'NLL':>{width}} {'ECE':>{width}} {'Brier':>{width}} {'active params':>14} "
          f"{'guide bytes':>12} {'seconds':>8}")
    for r in summary:
        print(f"{r['density']:>8g} {pm(r, 'accuracy', 4):>{width}} {pm(r, 'nll', 4):>{width}} {pm(r, 'ece', 4):>{width}} "
              f"{pm(r, 'brier', 4):>{width}} {r['active_params']:>7}/{r['dense_params']:<6} {r['guide_bytes']:>12} {r['seconds']:>8.1f}")
    if seeds > 1:
        print(f"(mean ± sd over {seeds} seeds, each its own train/test split and initialisation; seconds: training time per seed)")


def main(argv=None):
    args = parse_args(argv)
    results, probs_by_density, y_test = [], None, None
    for seed in range(args.seed, args.seed + args.seeds):
        reports, probs, labels = run_seed(args, seed)
        results += reports
        if probs_by_density is None:  # the reliability diagrams show the first seed
            probs_by_density, y_test = probs, labels
    summary = summarise(results, args.densities)
    print_table(summary)
    if args.plot:
        plot_reliability_diagrams(args.plot, probs_by_density, y_test)
        print(f"reliability diagrams: {args.plot} (seed {args.seed})")
    out = {"summary": summary, "results": results, "args": {k: v for k, v in vars(args).items()}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    run_main(main)
