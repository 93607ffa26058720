"""How many scheduled swaps really replace an entry, under each ELBO, prior and sampling.

    python benchmarks/exploration.py             # digits MLP, density 0.1 (about 3 minutes on 2 cores)

A subspace update removes ``n`` entries and adds the ``n`` best candidates; a candidate that
was just removed and is chosen again keeps its slot, so the update replaces fewer than ``n``.
If Monte Carlo prior / entropy terms leaked into the gradient that ``addition="gradient"``
ranks by, they would add about ``eps / sigma`` at the removed entries and re-add them at once.
This prints ``SSVI.replaced_fraction()`` (entries replaced / entries scheduled) for every
combination, with the mean ``|gradient|`` that addition saw at removed and at inactive entries.
Writes ``results/exploration.md`` and ``.json``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, run_parallel, write_results  # noqa: E402
from digits import data, make_net  # noqa: E402

ELBOS = ("TraceMeanField_ELBO", "Trace_ELBO", "TraceGraph_ELBO", "RenyiELBO")
PRIORS = ("Normal", "Laplace", "StudentT")


def fit(task):
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_ssvi import SSVI, BayesianClassifier, SparseSubspaceGuide, bayesianize
    from pyro_ssvi.criteria import GradientAddition

    elbo_name, prior_name, lrt, args = task
    xtr, ytr, _, _, _, _ = data()
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    prior = {"Normal": dist.Normal(0.0, 1.0), "Laplace": dist.Laplace(0.0, 1.0), "StudentT": dist.StudentT(3.0, 0.0, 1.0)}[prior_name]
    model = BayesianClassifier(bayesianize(make_net("mlp", 10), prior=prior), num_data=len(xtr))
    guide = SparseSubspaceGuide(model, density=0.1)
    guide.setup(xtr[:2], ytr[:2])
    elbo = getattr(pyro.infer, elbo_name)()  # RenyiELBO: alpha 0, 2 particles (its defaults)
    seen = {"removed": [], "inactive": []}

    class Recording(GradientAddition):
        def __call__(self, grad, candidates):
            seen["current"] = grad.abs()
            return super().__call__(grad, candidates)

    svi = SSVI(model, guide, pyro.optim.Adam({"lr": args.lr}), elbo, total_steps=args.steps, update_every=args.update_every,
               stop_updates_at=1.0, addition=Recording(), local_reparameterization=lrt)
    for _ in range(args.steps):
        before = {s: guide.active_mask(s).reshape(-1) for s in guide.sparse_site_names()}
        n_hist = len(svi.history)
        svi.step(xtr, ytr)
        if len(svi.history) > n_hist:  # gradient magnitudes at the last site scored
            site = guide.sparse_site_names()[-1]
            g = seen["current"]
            seen["inactive"].append(g[~before[site]].mean().item())
            seen["removed"].append(g[before[site]].mean().item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"elbo": elbo_name, "prior": prior_name, "lrt": lrt, "replaced_fraction": svi.replaced_fraction(),
            "updates": len(svi.history), "grad_active": mean(seen["removed"]), "grad_inactive": mean(seen["inactive"])}


def main(argv=None):
    p = ArgumentParser(description="Fraction of scheduled swaps that replace an entry, per ELBO / prior / LRT (digits MLP).")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    add_common_flags(p)
    args = p.parse_args(argv)
    if min(args.steps, args.update_every) < 1 or args.steps <= args.update_every:
        p.error("--steps and --update-every must be positive, with --steps > --update-every")
    tasks = [(e, pr, lrt, args) for e in ELBOS for pr in PRIORS for lrt in (False, True)]
    runs = run_parallel(fit, tasks, args.workers, "exploration")
    rows = [[r["elbo"], r["prior"], "LRT" if r["lrt"] else "weights", f"{r['replaced_fraction']:.2f}",
             f"{r['grad_active']:.3g}", f"{r['grad_inactive']:.3g}"] for r in runs]
    md = "\n".join([
        "# Exploration: scheduled swaps that replace an entry\n",
        f"Digits MLP (64-100-10) via `bayesianize`, SSVI density 0.1, full batch (1437 images), Adam lr {args.lr}, "
        f"{args.steps} steps, an update every {args.update_every} ({runs[0]['updates']} updates), snr_abs removal, "
        f"gradient addition, seed {args.seed}. Replaced: `SSVI.replaced_fraction()`. |grad|: mean absolute dense gradient "
        "that addition saw on fc2.weight at the active and at the inactive entries (averaged over updates).\n",
        "Before the data-term capture (issue 7, same model): 0.74 with TraceMeanField + Normal, 0.24 with Trace_ELBO, "
        "0.17 with Trace_ELBO + LRT, 0.26 with a Laplace prior; |grad| about 14 at active entries against 0.1-0.4 at "
        "inactive ones.\n",
        markdown_table(["ELBO", "prior", "sampling", "replaced", "|grad| active", "|grad| inactive"], rows),
    ])
    write_results("exploration", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    run_main(main)
