"""UCI regression benchmark: dense VI against SSVI at several densities (all 20 splits).

    python benchmarks/uci.py                    # the five sets of ../shared/data/uci, 20 splits
    python benchmarks/uci.py --datasets yacht --splits 3 --steps 500   # a quick look

Protocol of the published tables (see the data's README): per split, normalise inputs
and target with the training part's statistics, fit a one-hidden-layer network of 50
units with a Gaussian likelihood, report on the test part the RMSE and the average
predictive log-likelihood in the target's original units; mean +- standard error over
the splits. The noise scale is a point estimate learned with the ELBO. Writes
results/uci.{md,json,png}.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, add_optimizer_reset_flag, markdown_table, mean_se, pyplot, run_parallel, save_figure, write_results  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "uci"
DATASETS = ["bostonHousing", "concrete", "energy", "wine-quality-red", "yacht"]
METHODS = [("dense VI", 1.0), ("SSVI 0.5", 0.5), ("SSVI 0.2", 0.2), ("SSVI 0.1", 0.1)]

# Published results (mean +- standard error over the same 20 splits), transcribed from
# Hernandez-Lobato & Adams (2015), "Probabilistic Backpropagation for Scalable Learning of
# Bayesian Neural Networks", Table 1 (VI of Graves 2011, and PBP), and Gal & Ghahramani (2016),
# "Dropout as a Bayesian Approximation", Table 1 (MC dropout).
PUBLISHED = {
    "bostonHousing": {"VI": (4.32, 0.29, -2.90, 0.07), "PBP": (3.01, 0.18, -2.57, 0.09), "MC dropout": (2.97, 0.19, -2.46, 0.06)},
    "concrete": {"VI": (7.19, 0.12, -3.39, 0.02), "PBP": (5.67, 0.09, -3.16, 0.02), "MC dropout": (5.23, 0.12, -3.04, 0.02)},
    "energy": {"VI": (2.65, 0.08, -2.39, 0.03), "PBP": (1.80, 0.05, -2.04, 0.02), "MC dropout": (1.66, 0.04, -1.99, 0.02)},
    "wine-quality-red": {"VI": (0.65, 0.01, -0.98, 0.01), "PBP": (0.64, 0.01, -0.97, 0.01), "MC dropout": (0.62, 0.01, -0.93, 0.01)},
    "yacht": {"VI": (6.89, 0.67, -3.43, 0.16), "PBP": (1.02, 0.05, -1.63, 0.02), "MC dropout": (1.11, 0.09, -1.55, 0.03)},
}


def load_split(name, split):
    import numpy as np
    import torch

    folder = DATA / name
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    X, y = data[:, features], data[:, target]
    x_mean, x_std = X[train].mean(0), X[train].std(0)
    x_std[x_std == 0] = 1.0
    y_mean, y_std = y[train].mean(), y[train].std()
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (f((X[train] - x_mean) / x_std), f((y[train] - y_mean) / y_std), f((X[test] - x_mean) / x_std), f((y[test] - y_mean) / y_std), float(y_std))


def fit_one(task):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.nn import PyroModule, PyroSample

    from pyro_ssvi import SSVI, SparseSubspaceGuide
    from pyro_ssvi.metrics import gaussian_test_ll, mc_predict, rmse

    name, split, method, density, args = task
    xtr, ytr, xte, yte, y_std = load_split(name, split)

    class Net(PyroModule):
        def __init__(self, d, hidden):
            super().__init__()
            self.fc1 = PyroModule[torch.nn.Linear](d, hidden)
            self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([hidden, d]).to_event(2))
            self.fc2 = PyroModule[torch.nn.Linear](hidden, 1)
            self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, hidden]).to_event(2))
            self.log_noise = torch.nn.Parameter(torch.tensor(-1.0))

        def forward(self, x, y=None):
            mean = self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, self.log_noise.exp()), obs=y)
            return mean

    pyro.clear_param_store()
    pyro.set_rng_seed(1000 * split + args.seed)
    model = Net(xtr.shape[1], args.hidden)
    guide = SparseSubspaceGuide(model, density=density, init_scale=args.init_scale)
    svi = SSVI(
        model, guide, pyro.optim.Adam({"lr": args.lr}), pyro.infer.TraceMeanField_ELBO(),
        total_steps=args.steps, update_every=args.update_every, optimizer_reset=args.optimizer_reset,
    )
    for _ in range(args.steps):
        svi.step(xtr, ytr)
    means = mc_predict(model, guide, xte, num_samples=args.mc_samples)
    noise = model.log_noise.exp().item()
    return {
        "dataset": name,
        "split": split,
        "method": method,
        "density": density,
        "rmse": rmse(means.mean(0), yte, y_std),
        "test_ll": gaussian_test_ll(means, noise, yte, y_std),
        "active_params": guide.active_params,
        "dense_params": guide.dense_params,
    }


def parse_args(argv):
    p = ArgumentParser(description="UCI regression: dense VI vs SSVI.")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--splits", type=int, default=20, help="use splits 0..N-1 (at most 20)")
    p.add_argument("--steps", type=int, default=2000, help="full-batch SVI steps per fit")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--init-scale", type=float, default=1e-3)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--mc-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    add_common_flags(p)
    add_optimizer_reset_flag(p)
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        p.error(f"--datasets: unknown {unknown}; choose from {DATASETS}")
    if not 1 <= args.splits <= 20:
        p.error("--splits: expected 1..20")
    if not DATA.exists():
        p.error(f"UCI data not found at {DATA} (it ships in ../shared/data/uci)")
    return args


def main(argv=None):
    args = parse_args(argv)
    tasks = [(d, s, m, dens, args) for d in args.datasets for s in range(args.splits) for m, dens in METHODS]
    runs = run_parallel(fit_one, tasks, args.workers, "uci fits")
    rows, summary = [], {}
    for d in args.datasets:
        for m, _ in METHODS:
            sel = [r for r in runs if r["dataset"] == d and r["method"] == m]
            r_m, r_se = mean_se(r["rmse"] for r in sel)
            l_m, l_se = mean_se(r["test_ll"] for r in sel)
            summary[(d, m)] = (r_m, r_se, l_m, l_se)
            rows.append([d, m, f"{sel[0]['active_params']}/{sel[0]['dense_params']}", f"{r_m:.3f} ± {r_se:.3f}", f"{l_m:.3f} ± {l_se:.3f}"])
        for m, (r_m, r_se, l_m, l_se) in PUBLISHED[d].items():
            rows.append([d, f"{m} (published)", "", f"{r_m:.2f} ± {r_se:.2f}", f"{l_m:.2f} ± {l_se:.2f}"])
    md = "# UCI regression: dense VI vs SSVI\n\n"
    md += (
        f"One hidden layer of {args.hidden} units, N(0, 1) priors, Gaussian likelihood with a learned noise scale, "
        f"{args.steps} full-batch steps of Adam (lr {args.lr}, optimizer_reset {args.optimizer_reset}), {args.mc_samples} MC samples; mean ± standard error "
        f"over {args.splits} splits. Test RMSE (lower is better) and average test log-likelihood (higher is better), "
        "in the target's original units. Published rows: VI (Graves 2011) and PBP from Hernández-Lobato & Adams (2015, "
        "Table 1), MC dropout from Gal & Ghahramani (2016, Table 1); their networks and training budgets differ from ours.\n\n"
    )
    md += markdown_table(["data set", "method", "active / dense weights", "test RMSE", "test log-likelihood"], rows)
    plot(args, summary)
    write_results("uci", md, runs, args)
    print(md)
    return runs


def plot(args, summary):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(3.2 * len(args.datasets), 3), squeeze=False)
    dens = [dens for _, dens in METHODS]
    for ax, d in zip(axes[0], args.datasets):
        vals = [summary[(d, m)] for m, _ in METHODS]
        ax.errorbar(dens, [v[2] for v in vals], yerr=[v[3] for v in vals], marker="o", capsize=3, label="ours")
        for name, style in (("PBP", "--"), ("MC dropout", ":"), ("VI", "-.")):
            ax.axhline(PUBLISHED[d][name][2], ls=style, color="gray", lw=1, label=f"{name} (published)")
        ax.set_xscale("log")
        ax.set_title(d)
        ax.set_xlabel("density")
    axes[0][0].set_ylabel("test log-likelihood")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, args, "uci")


if __name__ == "__main__":
    run_main(main)
