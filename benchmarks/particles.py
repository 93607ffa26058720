"""Vectorised particles: seconds per SSVI step with P particles at once against P one after another.

    python benchmarks/particles.py            # digits MLP and CNN, P = 8, CPU (about 2 minutes)

``Trace_ELBO(num_particles=P, vectorize_particles=True)`` draws every weight once per particle
and runs the network once, with each particle's weight applied to its own slice
(``pyro_ssvi.BatchedLayersMessenger``: batched matmul for linear layers, a grouped convolution
for conv layers); ``Trace_ELBO(num_particles=P)`` runs guide and model P times. Both train the
same model (SSVI density 0.1; the CNN's first convolution dense) on minibatches of the
scikit-learn digits, with weight sampling and with local reparameterisation. The two are
timed in alternating blocks in this one run, so their ratio is measured side by side.
Target: vectorised at most 0.5x sequential on the MLP. Writes results/particles.{md,json,png}.
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402
from digits import data, make_net  # noqa: E402

MODES = ("sequential", "vectorised")


def build(arch, mode, lrt, args, n):
    import pyro
    import torch

    from pyro_ssvi import SSVI, BayesianClassifier, SparseSubspaceGuide, bayesianize

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = BayesianClassifier(bayesianize(make_net(arch, 10)), num_data=n)
    dense = ("net.1.weight",) if arch == "cnn" else ()
    guide = SparseSubspaceGuide(model, density=0.1, dense_sites=dense)
    elbo = pyro.infer.Trace_ELBO(num_particles=args.particles, vectorize_particles=mode == "vectorised")
    total = args.warmup + args.blocks * args.steps_per_block
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo, total_steps=10 * total, update_every=10 * total,
               local_reparameterization=lrt)
    return svi, torch


def measure(args):
    import torch

    xtr, ytr, *_ = data()
    n = len(xtr)
    g = torch.Generator().manual_seed(0)
    runs = []
    for arch in args.archs:
        for lrt in (False, True):
            svis = {m: build(arch, m, lrt, args, n)[0] for m in MODES}
            batches = [torch.randint(0, n, (args.batch_size,), generator=g) for _ in range(args.steps_per_block)]
            for m in MODES:
                for _ in range(args.warmup):
                    svis[m].step(xtr[batches[0]], ytr[batches[0]])
            times = {m: [] for m in MODES}
            for block in range(args.blocks):  # alternate the order block by block
                for m in (MODES if block % 2 == 0 else MODES[::-1]):
                    for idx in batches:
                        t0 = time.perf_counter()
                        svis[m].step(xtr[idx], ytr[idx])
                        times[m].append(time.perf_counter() - t0)
            med = {m: statistics.median(times[m]) for m in MODES}
            runs.append({
                "arch": arch, "lrt": lrt, "particles": args.particles, "batch_size": args.batch_size,
                "sequential_seconds": med["sequential"], "vectorised_seconds": med["vectorised"],
                "ratio": med["vectorised"] / med["sequential"], "steps_timed": len(times["sequential"]),
            })
            print(f"{arch} lrt={lrt}: sequential {med['sequential'] * 1e3:.1f} ms, vectorised {med['vectorised'] * 1e3:.1f} ms, "
                  f"ratio {runs[-1]['ratio']:.2f}", flush=True)
    return runs


def plot(runs, args):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['arch']}{' LRT' if r['lrt'] else ''}" for r in runs]
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], [r["sequential_seconds"] * 1e3 for r in runs], 0.4, label=f"{args.particles} sequential")
    ax.bar([x + 0.2 for x in xs], [r["vectorised_seconds"] * 1e3 for r in runs], 0.4, label=f"{args.particles} vectorised")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms per SSVI step")
    ax.legend()
    save_figure(fig, args, "particles")


def main(argv=None):
    p = ArgumentParser(description="Seconds per SSVI step: vectorised against sequential particles (digits MLP and CNN).")
    p.add_argument("--archs", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--particles", type=int, default=8, help="P, particles per step")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per configuration")
    p.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per configuration")
    p.add_argument("--steps-per-block", type=int, default=10)
    add_common_flags(p)
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    if not args.archs or set(args.archs) - {"mlp", "cnn"}:
        p.error(f"--archs: expected a comma-separated subset of mlp,cnn, got {','.join(args.archs)!r}")
    if min(args.particles, args.batch_size, args.blocks, args.steps_per_block) < 1 or args.warmup < 0:
        p.error("--particles, --batch-size, --blocks and --steps-per-block must be positive")
    import torch

    runs = measure(args)
    rows = [[r["arch"], "on" if r["lrt"] else "off", f"{r['sequential_seconds'] * 1e3:.1f}", f"{r['vectorised_seconds'] * 1e3:.1f}",
             f"{r['ratio']:.2f}x"] for r in runs]
    mlp = [r["ratio"] for r in runs if r["arch"] == "mlp"]
    verdict = (f"MLP: vectorised {max(mlp):.2f}x sequential at most (target 0.5x): {'met' if max(mlp) <= 0.5 else 'NOT met'}."
               if mlp else "")
    md = "\n".join([
        "# Vectorised against sequential particles\n",
        f"SSVI density 0.1, Trace_ELBO with {args.particles} particles, minibatch {args.batch_size} of the scikit-learn digits, "
        f"Adam; median seconds per step over {args.blocks} alternating blocks of {args.steps_per_block} steps after "
        f"{args.warmup} warm-up steps; {torch.get_num_threads()} torch threads, {'CUDA' if torch.cuda.is_available() else 'CPU'} "
        "(this run uses the CPU). MLP 64-100-10; CNN conv 1-16 3x3 (dense), conv 16-32 3x3, 2x2 average pool, linear 512-10.\n",
        markdown_table(["net", "LRT", "sequential ms/step", "vectorised ms/step", "vectorised / sequential"], rows),
        "",
        verdict,
    ])
    plot(runs, args)
    write_results("particles", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    run_main(main)
