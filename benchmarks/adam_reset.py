"""Adam after a subspace update: do reset slots need their own bias correction?

    python benchmarks/adam_reset.py              # digits MLP, density 0.1, 5 seeds (about 2 minutes on 2 cores)

SSVI zeroes the optimiser state of every slot an update refills (``reset_optimizer_state``).
With ``torch.optim.Adam`` the step count is shared by the whole tensor, so a refilled slot
starts with zero moments but a bias correction of ``1 - beta^t ~ 1``: its first steps are
``(1 - beta1) g / sqrt((1 - beta2) g^2) ~ 3.2`` times ``lr`` for large ``t`` instead of Adam's
``lr``. This benchmark trains the same model with ``SSVI(..., optimizer_reset="zero")`` (zeroed
state only) and ``optimizer_reset="fresh"`` (the default: the slot then steps exactly like a
fresh Adam, ``pyro_ssvi.fresh_adam_correction``), and reports

* the mean ``|step| / lr`` of refilled slots over the 10 steps after each update, and of
  the other slots over the same steps;
* test accuracy, NLL and ECE of the MC-averaged predictive.

Writes ``results/adam_reset.md`` and ``.json``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, mean_std, run_parallel, write_results  # noqa: E402
from digits import data, make_net  # noqa: E402


def fit(task):
    import pyro
    import torch

    from pyro_ssvi import SSVI, BayesianClassifier, SparseSubspaceGuide, bayesianize
    from pyro_ssvi.metrics import classification_metrics, mc_predict

    optimiser, seed, args = task
    xtr, ytr, xte, yte, _, _ = data()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    n = len(xtr)
    model = BayesianClassifier(bayesianize(make_net("mlp", 10)), num_data=n)
    guide = SparseSubspaceGuide(model, density=0.1)
    guide(xtr[:2], ytr[:2])
    params = list(guide.parameters()) + list(model.parameters())
    optim = torch.optim.Adam(params, lr=args.lr)
    svi = SSVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO(), total_steps=args.steps, update_every=args.update_every,
               optimizer_reset=optimiser)
    locs = [guide.loc(s) for s in guide.sparse_site_names()]
    moved = {"refilled": [], "other": []}
    watch, prev = None, None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch_size,))
        before = [loc.detach().clone() for loc in locs]
        index_before = [guide.active_index(s).clone() for s in guide.sparse_site_names()]
        svi.step(xtr[idx], ytr[idx])
        if watch is not None and step <= watch[0]:
            for loc, b, mask in zip(locs, before, watch[1]):
                delta = (loc.detach() - b).abs() / args.lr
                if not mask.any():
                    continue
                moved["refilled"].append(delta[mask].mean().item())
                moved["other"].append(delta[~mask].mean().item())
        if svi.history and svi.history[-1]["step"] == step:
            masks = [guide.active_index(s) != ib for s, ib in zip(guide.sparse_site_names(), index_before)]
            watch = (step + 10, masks)
    probs = mc_predict(model, guide, xte, num_samples=args.mc_samples).softmax(-1).mean(0)
    return {
        "optimiser": optimiser, "seed": seed, **classification_metrics(probs, yte),
        "refilled_step_over_lr": sum(moved["refilled"]) / len(moved["refilled"]),
        "other_step_over_lr": sum(moved["other"]) / len(moved["other"]),
        "updates": len(svi.history),
    }


OPTIMISERS = ("zero", "fresh")


def main(argv=None):
    p = ArgumentParser(description="Adam after a subspace update: shared vs per-slot bias correction (digits MLP).")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--mc-samples", type=int, default=20)
    add_common_flags(p)
    args = p.parse_args(argv)
    if min(args.seeds, args.steps, args.batch_size, args.update_every, args.mc_samples) < 1:
        p.error("--seeds, --steps, --batch-size, --update-every and --mc-samples must be positive")
    runs = run_parallel(fit, [(o, s, args) for o in OPTIMISERS for s in range(args.seeds)], args.workers, "adam fits")
    rows = []
    for o in OPTIMISERS:
        rs = [r for r in runs if r["optimiser"] == o]
        cell = lambda key, fmt="{:.3f}": "{} ± {}".format(*(fmt.format(v) for v in mean_std(r[key] for r in rs)))  # noqa: E731
        rows.append([o, cell("refilled_step_over_lr", "{:.2f}"), cell("other_step_over_lr", "{:.2f}"), cell("accuracy"), cell("nll"), cell("ece")])
    md = "\n".join([
        "# Adam after a subspace update\n",
        f"Digits MLP (64-100-10, N(0, 1) priors), SSVI density 0.1, TraceMeanField_ELBO, torch.optim.Adam, {args.steps} steps of "
        f"minibatch {args.batch_size}, lr {args.lr}, update every {args.update_every} (snr_abs removal, gradient addition); "
        f"mean ± sd over {args.seeds} seeds. Step sizes: mean |change of loc| / lr over the 10 steps after each update.\n",
        markdown_table(["optimizer_reset", "refilled slots: step / lr", "other slots: step / lr", "accuracy", "NLL", "ECE"], rows),
    ])
    write_results("adam_reset", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    run_main(main)
