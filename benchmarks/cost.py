"""Cost benchmark: time, memory, guide state and FLOPs of dense VI (Pyro's AutoNormal) vs SSVI.

    python benchmarks/cost.py                          # ResNet-18 (CIFAR input, batch 32) and a 3-layer MLP
    python benchmarks/cost.py --models mlp3 --repeats 5 # a quick look

For each network it measures, for Pyro's ``AutoNormal`` (dense VI as a Pyro user writes it
today), our guide at density 1, and SSVI at densities 0.1 and 0.05, each with weight sampling
and with local reparameterisation (LRT):
  * seconds per SVI step: median of ``--repeats`` steps after ``--warmup`` steps, all configs
    run one after the other in this run (ratios against AutoNormal are measured side by side);
  * peak memory: the process's peak resident set size on CPU (each config runs in a fresh
    process; ``torch.cuda.max_memory_allocated`` on a GPU), and its growth over the process
    size before the first step;
  * guide-state bytes: guide parameters + buffers (active indices) + Adam state;
  * counted training FLOPs per step (forward + 2x backward, sparse layers scaled by density; ``pyro_ssvi.cost.flops_report``).
SSVI's update steps (one every ``--update-every``) are timed separately. Writes
results/cost.{md,json,png}.
"""

import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402

GUIDES = [("AutoNormal", None), ("ours, density 1", 1.0), ("SSVI 0.1", 0.1), ("SSVI 0.05", 0.05)]
MODELS = {"resnet18": "ResNet-18 (CIFAR, batch 32)", "mlp3": "3-layer MLP (input 784, batch 128)"}


def build(model_name, device, width=64, mlp_width=1024):
    import torch
    import torch.nn as nn

    from pyro_ssvi.models import BayesianClassifier, bayesianize, cifar_resnet18

    if model_name == "resnet18":
        model = cifar_resnet18(num_classes=10, width=width, num_data=50000)
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    else:
        net = nn.Sequential(nn.Linear(784, mlp_width), nn.ReLU(), nn.Linear(mlp_width, mlp_width), nn.ReLU(), nn.Linear(mlp_width, 10))
        model = BayesianClassifier(bayesianize(net), num_data=60000)
        x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return model.to(device), x.to(device), y.to(device)


def rss_kib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(cfg):
    """Run one configuration in this process; return its measurements."""
    import time

    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
    from pyro_ssvi.cost import flops_report, guide_state_bytes

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    model, x, y = build(cfg["model"], device, cfg["width"], cfg["mlp_width"])
    density = cfg["density"]
    optim = pyro.optim.Adam({"lr": 1e-3})
    elbo = pyro.infer.TraceMeanField_ELBO()
    # the FLOP accounting needs a SparseSubspaceGuide: AutoNormal is dense VI (density 1, no updates)
    counting_guide = SparseSubspaceGuide(model, density=1.0 if density is None else density, dense_sites=model.dense_sites)
    counting_guide(x, y)
    flops = flops_report(
        model, counting_guide, x, local_reparameterization=cfg["lrt"], update_every=cfg["flops_update_every"],
        gradient_addition=density is not None and density < 1,
    )
    del counting_guide
    pyro.clear_param_store()
    if density is None:
        guide = AutoNormal(model, init_scale=1e-3)
        svi = pyro.infer.SVI(model, guide, optim, elbo)
        lrt = LocalReparameterizationMessenger() if cfg["lrt"] else None
    else:
        guide = SparseSubspaceGuide(model, density=density, dense_sites=model.dense_sites, init_scale=1e-3)
        svi = SSVI(model, guide, optim, elbo, total_steps=10**9, update_every=cfg["update_every"], local_reparameterization=cfg["lrt"])
        lrt = None
    guide(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_kib()
    times, update_times = [], []
    for i in range(cfg["warmup"] + cfg["repeats"]):
        t0 = time.perf_counter()
        if lrt is not None:
            with lrt:
                svi.step(x, y)
        else:
            svi.step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        is_update = density is not None and svi.history and svi.history[-1]["step"] == svi.step_count
        if i >= cfg["warmup"]:
            (update_times if is_update else times).append(dt)
    times.sort()
    out = {
        **cfg,
        "seconds_per_step": times[len(times) // 2],
        "seconds_all": times,
        "update_step_seconds": sorted(update_times)[len(update_times) // 2] if update_times else None,
        "guide_bytes": guide_state_bytes(guide, optim),
        "train_flops_per_step": flops["train_flops_per_step"] if density is not None else flops["dense_vi_train_flops_per_step"],
        "dense_vi_train_flops_per_step": flops["dense_vi_train_flops_per_step"],
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["memory_growth_bytes"] = None
    else:
        peak = rss_kib()
        out["peak_memory_bytes"] = peak * 1024
        out["memory_growth_bytes"] = (peak - before) * 1024
    return out


def run_config(cfg):
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"config {cfg} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mib(b):
    return f"{b / 2**20:.1f}" if b is not None else "n/a"


def report(args, runs):
    md = ["# Cost: dense VI (Pyro AutoNormal) vs SSVI\n"]
    md.append(
        f"Device: {args.device}. Seconds per step: median of {args.repeats} steps after {args.warmup} warm-up steps "
        f"(TraceMeanField_ELBO, Adam); SSVI update steps (every {args.update_every}) are timed apart. Peak memory: "
        + ("torch.cuda.max_memory_allocated over the training steps (warm-up included), one fresh process per configuration (no growth figure). "
           if args.device == "cuda" else
           "peak RSS of a fresh process per configuration (its growth during training in brackets). ")
        + "Guide bytes: parameters, "
        "index and birth buffers, Adam state. FLOPs: counted training FLOPs per step (forward + 2x backward, sparse layers scaled by density). Ratios are against "
        f"AutoNormal with the same sampling, measured in this run; the FLOP count amortises a gradient-based addition over "
        f"{args.flops_update_every} steps (the recipe's update period).\n"
    )
    for model in args.models:
        md.append(f"## {MODELS[model]}\n")
        rows = []
        for lrt in (False, True):
            base = next(r for r in runs if r["model"] == model and r["lrt"] == lrt and r["density"] is None)
            for name, density in GUIDES:
                r = next(r for r in runs if r["model"] == model and r["lrt"] == lrt and r["density"] == density)
                rows.append([
                    name, "LRT" if lrt else "weights",
                    f"{r['seconds_per_step']:.4f}", f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}",
                    f"{r['update_step_seconds']:.4f}" if r["update_step_seconds"] else "",
                    f"{mib(r['peak_memory_bytes'])} ({mib(r['memory_growth_bytes'])})",
                    f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}",
                    f"{r['guide_bytes']:,}", f"{r['guide_bytes'] / base['guide_bytes']:.3f}",
                    f"{r['train_flops_per_step']:.3e}", f"{r['train_flops_per_step'] / base['train_flops_per_step']:.3f}",
                ])
        md.append(markdown_table(
            ["guide", "sampling", "s/step", "x AutoNormal", "update step s", "peak MiB (growth)", "x", "guide bytes", "x", "train FLOPs/step", "x"], rows
        ) + "\n")
    if "resnet18" in args.models:
        md.append("## Targets (ResNet-18, density 0.1)\n")
        get = lambda lrt, d: next(r for r in runs if r["model"] == "resnet18" and r["lrt"] == lrt and r["density"] == d)  # noqa: E731
        b, s = get(False, None), get(False, 0.1)
        checks = [
            ("guide-state bytes <= 0.15x AutoNormal's", s["guide_bytes"] / b["guide_bytes"], 0.15),
            ("seconds per step (weight sampling) <= 1.05x AutoNormal's", s["seconds_per_step"] / b["seconds_per_step"], 1.05),
            ("counted training FLOPs <= 0.15x dense VI's", s["train_flops_per_step"] / s["dense_vi_train_flops_per_step"], 0.15),
        ]
        md.append(markdown_table(["target", "measured", "bound", "met"], [[t, f"{v:.3f}", f"{bound}", "yes" if v <= bound else "NO"] for t, v, bound in checks]) + "\n")
    return "\n".join(md)


def plot(args, runs):
    plt = pyplot()

    fig, axes = plt.subplots(len(args.models), 3, figsize=(13, 3.2 * len(args.models)), squeeze=False)
    for row, model in zip(axes, args.models):
        for ax, key, title in zip(row, ("seconds_per_step", "guide_bytes", "train_flops_per_step"), ("seconds / step", "guide-state bytes", "training FLOPs / step")):
            for i, lrt in enumerate((False, True)):
                vals = [next(r for r in runs if r["model"] == model and r["lrt"] == lrt and r["density"] == d)[key] for _, d in GUIDES]
                ax.bar([j + 0.4 * i for j in range(len(GUIDES))], vals, width=0.4, label="LRT" if lrt else "weight sampling")
            ax.set_xticks([j + 0.2 for j in range(len(GUIDES))], [n for n, _ in GUIDES], fontsize=7)
            ax.set_title(f"{MODELS[model]}: {title}", fontsize=8)
            if key != "seconds_per_step":
                ax.set_yscale("log")
        row[0].legend(fontsize=7)
    save_figure(fig, args, "cost")


def parse_args(argv):
    p = ArgumentParser(description="Cost of dense VI vs SSVI: time, memory, guide state, FLOPs.")
    p.add_argument("--models", default="resnet18,mlp3", help="comma-separated: resnet18, mlp3")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--update-every", type=int, default=4, help="SSVI update period while timing (small, so update steps get timed)")
    p.add_argument("--flops-update-every", type=int, default=100, help="update period the FLOP count amortises the gradient addition over (the recipe's 100)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    p.add_argument("--mlp-width", type=int, default=1024, help="hidden width of the MLP")
    add_common_flags(p)
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    if set(args.models) - set(MODELS):
        p.error(f"--models: choose from {sorted(MODELS)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm

    configs = [
        {"model": m, "density": d, "lrt": lrt, "repeats": args.repeats, "warmup": args.warmup, "update_every": args.update_every, "flops_update_every": args.flops_update_every, "device": args.device, "width": args.width, "mlp_width": args.mlp_width}
        for m in args.models for lrt in (False, True) for _, d in GUIDES
    ]
    runs = [run_config(c) for c in tqdm(configs, desc="cost configs")]
    md = report(args, runs)
    plot(args, runs)
    write_results("cost", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        run_main(main)
