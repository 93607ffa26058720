"""Cost benchmark: time, memory, guide state and FLOPs of dense VI (Pyro's AutoNormal) vs SSVI.

    python benchmarks/cost.py                          # ResNet-18 (CIFAR input, batch 32) and a 3-layer MLP
    python benchmarks/cost.py --models mlp3 --repeats 5 # a quick look

For each network it measures, for Pyro's ``AutoNormal`` (dense VI as a Pyro user writes it
today), our guide at density 1, and SSVI at densities 0.1 and 0.05 (and at 0.1 with
``sparse_kernels=False``: zero-filled dense weights, as before the sparse kernels), each with
weight sampling and with local reparameterisation (LRT); ``--baseline-ref REF`` adds SSVI 0.1 run
with the package as it was at git commit REF (e.g. before the sparse kernels), side by side:
  * seconds per SVI step: median of ``--repeats`` steps after ``--warmup`` steps. The configs of one
    network and sampling run side by side, each in its own process, stepped in rounds (in a rotating
    order), so the slow phases of a noisy machine fall on all alike. Each round gives each config
    ``--block`` consecutive steps; the first one follows the other processes' steps (cold caches,
    which a training loop running steps back to back does not pay, and which weighs most on short
    steps) and is timed apart ("cold" in the JSON), the next ``block - 1`` plain steps are timed
    (update steps in between are timed apart);
  * peak memory: the process's peak resident set size on CPU (each config runs in a fresh
    process; ``torch.cuda.max_memory_allocated`` on a GPU), and its growth over the process
    size before the first step;
  * guide-state bytes: guide parameters + buffers (active indices) + Adam state;
  * counted training FLOPs per step (forward + 2x backward, sparse layers scaled by density; ``pyro_ssvi.cost.flops_report``).
SSVI's update steps (one every ``--update-every``) are timed separately. Writes
results/cost.{md,json,png}.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if os.environ.get("PYRO_SSVI_COST_PACKAGE"):  # a --serve worker for the baseline commit: its package first
    sys.path.insert(0, os.environ["PYRO_SSVI_COST_PACKAGE"])

try:
    from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
except ImportError:  # a --baseline-ref commit from before the helpers moved to pyro_ssvi.scripts
    from pyro_ssvi.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402

#: (row name, density, sparse_kernels): AutoNormal is Pyro's dense VI; "kernels off" is SSVI on
#: dense zero-filled weights (sparse_kernels=False, what SSVI ran before the sparse kernels)
GUIDES = [("AutoNormal", None, None), ("ours, density 1", 1.0, "auto"), ("SSVI 0.1, kernels off", 0.1, False),
          ("SSVI 0.1", 0.1, "auto"), ("SSVI 0.05", 0.05, "auto")]


def find(runs, model, lrt, density, kernels):
    return next(r for r in runs if r["model"] == model and r["lrt"] == lrt and r["density"] == density and r["kernels"] == kernels)


def median(values):
    """The (upper) median of ``values``, or ``None`` when there are none."""
    return sorted(values)[len(values) // 2] if values else None


ROOT = pathlib.Path(__file__).resolve().parents[1]
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


class Config:
    """One configuration, set up in this process: ``step()`` times one SVI step, ``report()`` sums up."""

    def __init__(self, cfg):
        import pyro
        import torch
        from pyro.infer.autoguide import AutoNormal

        from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
        from pyro_ssvi.cost import flops_report

        self.cfg, self.device = cfg, torch.device(cfg["device"])
        torch.manual_seed(0)
        pyro.set_rng_seed(0)
        model, self.x, self.y = build(cfg["model"], self.device, cfg["width"], cfg["mlp_width"])
        self.density = density = cfg["density"]
        self.optim = pyro.optim.Adam({"lr": 1e-3})
        elbo = pyro.infer.TraceMeanField_ELBO()
        # the FLOP accounting needs a SparseSubspaceGuide: AutoNormal is dense VI (density 1, no updates)
        counting_guide = SparseSubspaceGuide(model, density=1.0 if density is None else density, dense_sites=model.dense_sites)
        counting_guide(self.x, self.y)
        self.flops = flops_report(
            model, counting_guide, self.x, local_reparameterization=cfg["lrt"], update_every=cfg["flops_update_every"],
            gradient_addition=density is not None and density < 1,
        )
        del counting_guide
        pyro.clear_param_store()
        self.lrt = None
        if density is None:
            self.guide = AutoNormal(model, init_scale=1e-3)
            self.svi = pyro.infer.SVI(model, self.guide, self.optim, elbo)
            self.lrt = LocalReparameterizationMessenger() if cfg["lrt"] else None
        else:
            # the baseline commit's guide predates the sparse_kernels argument
            kernels = {} if cfg["kernels"] == "baseline" else {"sparse_kernels": cfg["kernels"]}
            self.guide = SparseSubspaceGuide(model, density=density, dense_sites=model.dense_sites, init_scale=1e-3, **kernels)
            self.svi = SSVI(model, self.guide, self.optim, elbo, total_steps=10**9, update_every=cfg["update_every"],
                            local_reparameterization=cfg["lrt"])
        self.guide(self.x, self.y)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.before = rss_kib()
        self.times, self.update_times, self.cold_times, self.steps = [], [], [], 0

    def step(self, cold=False):
        """One SVI step; returns its seconds and whether it was a subspace-update step. A ``cold`` step
        (the first of a block, after other processes ran) is recorded apart."""
        import time

        import torch

        t0 = time.perf_counter()
        if self.lrt is not None:
            with self.lrt:
                self.svi.step(self.x, self.y)
        else:
            self.svi.step(self.x, self.y)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        is_update = bool(self.density is not None and self.svi.history and self.svi.history[-1]["step"] == self.svi.step_count)
        self.steps += 1
        if self.steps > self.cfg["warmup"]:
            (self.update_times if is_update else self.cold_times if cold else self.times).append(dt)
        return dt, is_update

    def report(self):
        import torch

        from pyro_ssvi.cost import guide_state_bytes

        out = {
            **self.cfg,
            "seconds_per_step": median(self.times),
            "seconds_all": sorted(self.times),
            "update_step_seconds": median(self.update_times),
            "cold_seconds_per_step": median(self.cold_times),
            "guide_bytes": guide_state_bytes(self.guide, self.optim),
            "train_flops_per_step": self.flops["train_flops_per_step"] if self.density is not None else self.flops["dense_vi_train_flops_per_step"],
            "dense_vi_train_flops_per_step": self.flops["dense_vi_train_flops_per_step"],
            "kernel_choices": self.guide.kernel_report() if hasattr(self.guide, "kernel_report") else {},
        }
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            out["memory_growth_bytes"] = None
        else:
            peak = rss_kib()
            out["peak_memory_bytes"] = peak * 1024
            out["memory_growth_bytes"] = (peak - self.before) * 1024
        return out


def serve(cfg):
    """Worker process: set up ``cfg``, then answer ``step`` and ``report`` lines on stdin with JSON lines."""
    config = Config(cfg)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() in ("step", "cold step"):
            dt, is_update = config.step(cold=line.strip() == "cold step")
            print(json.dumps({"seconds": dt, "update": is_update, "timed": len(config.times)}), flush=True)
        elif line.strip() == "report":
            print(json.dumps(config.report()), flush=True)
            return


class Worker:
    """A configuration in its own process (fresh memory accounting), driven one step at a time."""

    def __init__(self, cfg, package_root=None):
        env = dict(os.environ)
        if package_root is not None:  # run the package as it is in another tree (the baseline commit)
            env["PYRO_SSVI_COST_PACKAGE"] = str(package_root)
        self.cfg = cfg
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def _ask(self, line=None):
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"config {self.cfg} failed:\n{self.proc.stderr.read()[-2000:]}")
        return json.loads(answer)

    def ready(self):
        return self._ask()

    def step(self, cold=False):
        return self._ask("cold step" if cold else "step")

    def report(self):
        out = self._ask("report")
        self.proc.wait()
        return out


def replicate(cfgs, package_roots, replicas):
    """Each configuration in ``replicas`` processes (``"replica": 0, 1, ...``; only replica 0 profiles)."""
    out = [({**c, "replica": r, **({"profile_steps": 0} if r and c.get("profile_steps") else {})}, root)
           for c, root in zip(cfgs, package_roots) for r in range(replicas)]
    return [c for c, _ in out], [root for _, root in out]


def pool_replicas(cfgs, reports):
    """One report per configuration from the reports of its replica processes (``reports[i]`` that of
    ``cfgs[i]``, configurations as :func:`replicate` returns them): the timed steps pooled
    (``seconds_all``, and ``seconds_per_step`` their median), the other medians as the median over
    replicas, each process's median in ``replica_seconds`` (and each one's kernel choices in
    ``replica_kernel_choices`` when they differ); everything else from replica 0."""
    groups = {}
    for c, r in zip(cfgs, reports):
        groups.setdefault(json.dumps({k: v for k, v in c.items() if k not in ("replica", "profile_steps")}, sort_keys=True), []).append(r)
    pooled = []
    for runs in groups.values():
        first = dict(runs[0])
        first["seconds_all"] = sorted(t for r in runs for t in r["seconds_all"])
        first["seconds_per_step"] = median(first["seconds_all"])
        first["replica_seconds"] = [r["seconds_per_step"] for r in runs]
        choices = [r.get("kernel_choices") for r in runs]
        if any(c != choices[0] for c in choices):  # "auto" measured per process: say when the replicas chose differently
            first["replica_kernel_choices"] = choices
        for k in ("cold_seconds_per_step", "update_step_seconds"):
            if k in first:
                first[k] = median([r[k] for r in runs if r.get(k) is not None])
        first.pop("replica", None)
        pooled.append(first)
    return pooled


def round_order(n, i):
    """The order of the ``n`` configurations in round ``i``: a permutation drawn with seed ``i`` (the same
    in every run), so no configuration always follows the same one. The process that ran before leaves
    warm caches for itself and spinning OpenMP threads for the next, whose first step pays for them;
    in a fixed cyclic order that cost would fall on the same configuration every round."""
    import random

    order = list(range(n))
    random.Random(i).shuffle(order)
    return order


def run_group(cfgs, package_roots, progress, block=1, replicas=1):
    """Time ``cfgs`` side by side: every round gives each configuration ``block`` consecutive steps
    (the first of them cold when ``block > 1``), in an order that changes from round to round
    (:func:`round_order`), so slow phases of a noisy machine
    fall on all of them alike; rounds go on until each has ``repeats`` timed steps. With ``replicas > 1``
    each configuration runs in that many processes (a process's speed varies by several percent on a
    shared machine, for its whole life) and its figures pool theirs (:func:`pool_replicas`). Returns
    one report per configuration."""
    cfgs, package_roots = replicate(cfgs, package_roots, replicas)
    workers = [Worker(c, r) for c, r in zip(cfgs, package_roots)]
    try:
        for w in workers:
            w.ready()
        timed = [0] * len(workers)
        i = 0
        while min(timed) < cfgs[0]["repeats"]:
            for w in round_order(len(workers), i):
                if block > 1:
                    workers[w].step(cold=True)
                target = timed[w] + max(block - 1, 1)
                while timed[w] < target:  # warm-up and update steps do not count
                    timed[w] = workers[w].step()["timed"]
            progress.update(1)
            i += 1
        return pool_replicas(cfgs, [w.report() for w in workers])
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()


def run_rounds(groups, args, run_one):
    """Every group of configurations (one table half or network) stepped in rotating rounds under one
    progress bar; ``run_one(cfgs, progress, tree)`` runs a group, ``tree`` being the ``--baseline-ref``
    worktree (checked out once for all groups) or ``None``. Returns the runs of all groups."""
    from tqdm.auto import tqdm

    runs = []
    per_group = -(-(args.warmup + args.repeats) // max(args.block - 1, 1))  # rounds, about (update steps are timed apart)
    with contextlib.ExitStack() as stack, tqdm(total=len(groups) * per_group, desc="rounds") as progress:
        tree = baseline_tree(args.baseline_ref, stack) if args.baseline_ref else None
        for cfgs in groups:
            runs += run_one(cfgs, progress, tree)
    return runs


def baseline_tree(ref, stack):
    """A temporary git worktree of ``ref`` (removed when ``stack`` closes)."""
    import tempfile

    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    tree = pathlib.Path(tmp) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True, capture_output=True, text=True)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return tree


def add_replicas_flag(parser):
    parser.add_argument("--replicas", type=int, default=1, help="processes per configuration, their timed steps pooled "
                        "(a process's speed varies by several percent for its whole life on a shared machine; 2 or 3 "
                        "make a 5%% comparison trustworthy, at 2-3x the time and memory)")


def guide_rows(args):
    """The table's rows: GUIDES, plus SSVI 0.1 at ``--baseline-ref`` when given."""
    return GUIDES + ([(f"SSVI 0.1 at {args.baseline_ref}", 0.1, "baseline")] if args.baseline_ref else [])


def mib(b):
    return f"{b / 2**20:.1f}" if b is not None else "n/a"


def report(args, runs):
    md = ["# Cost: dense VI (Pyro AutoNormal) vs SSVI\n"]
    md.append(
        f"Device: {args.device}. Seconds per step: median of {args.repeats} or more steps after {args.warmup} warm-up steps, "
        f"the configurations of a table half stepped in alternation ({args.block} consecutive steps each per round"
        + (", the first of them, after the other processes' steps, timed apart as 'cold' in the JSON) " if args.block > 1 else ") ")
        + f"(TraceMeanField_ELBO, Adam); SSVI update steps (every {args.update_every}) are timed apart. Peak memory: "
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
            base = find(runs, model, lrt, None, None)
            for name, density, kernels in guide_rows(args):
                r = find(runs, model, lrt, density, kernels)
                cold = r.get("cold_seconds_per_step")
                rows.append([
                    name, "LRT" if lrt else "weights",
                    f"{r['seconds_per_step']:.4f}", f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}",
                    f"{cold:.4f} ({cold / base['cold_seconds_per_step']:.2f})" if cold and base.get("cold_seconds_per_step") else "",
                    f"{r['update_step_seconds']:.4f}" if r["update_step_seconds"] else "",
                    f"{mib(r['peak_memory_bytes'])} ({mib(r['memory_growth_bytes'])})",
                    f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}",
                    f"{r['guide_bytes']:,}", f"{r['guide_bytes'] / base['guide_bytes']:.3f}",
                    f"{r['train_flops_per_step']:.3e}", f"{r['train_flops_per_step'] / base['train_flops_per_step']:.3f}",
                ])
        md.append(markdown_table(
            ["guide", "sampling", "s/step", "x AutoNormal", "cold s/step (x)", "update step s", "peak MiB (growth)", "x", "guide bytes", "x", "train FLOPs/step", "x"], rows
        ) + "\n")
    if "resnet18" in args.models:
        md.append("## Targets (ResNet-18, density 0.1)\n")
        b, s = find(runs, "resnet18", False, None, None), find(runs, "resnet18", False, 0.1, "auto")
        checks = [
            ("guide-state bytes <= 0.15x AutoNormal's", s["guide_bytes"] / b["guide_bytes"], 0.15),
            ("seconds per step (weight sampling) <= 1.05x AutoNormal's", s["seconds_per_step"] / b["seconds_per_step"], 1.05),
            ("counted training FLOPs <= 0.15x dense VI's", s["train_flops_per_step"] / s["dense_vi_train_flops_per_step"], 0.15),
        ]
        md.append(markdown_table(["target", "measured", "bound", "met"], [[t, f"{v:.3f}", f"{bound}", "yes" if v <= bound else "NO"] for t, v, bound in checks]) + "\n")
    checks = []
    # "today's SSVI": the package at --baseline-ref when measured, else this package with sparse kernels off
    before, before_name = ("baseline", f"SSVI at {args.baseline_ref}") if args.baseline_ref else (False, "kernels off")
    if "mlp3" in args.models:
        for lrt, what in ((False, "weight sampling"), (True, "LRT")):
            b, old, on = (find(runs, "mlp3", lrt, d, k) for d, k in ((None, None), (0.1, before), (0.1, "auto")))
            checks.append((f"MLP s/step, {what}: SSVI 0.1 <= 0.25x AutoNormal's", on["seconds_per_step"] / b["seconds_per_step"], 0.25))
            if on["memory_growth_bytes"] is not None and old["memory_growth_bytes"]:
                checks.append((f"MLP peak memory growth, {what}: SSVI 0.1 <= 0.5x {before_name}", on["memory_growth_bytes"] / old["memory_growth_bytes"], 0.5))
    if "resnet18" in args.models:
        for lrt, what in ((False, "weight sampling"), (True, "LRT")):
            old, on = find(runs, "resnet18", lrt, 0.1, before), find(runs, "resnet18", lrt, 0.1, "auto")
            checks.append((f"ResNet-18 s/step, {what}: SSVI 0.1 / {before_name} (no slower; 5% timing noise)", on["seconds_per_step"] / old["seconds_per_step"], 1.05))
    if checks:
        md.append("## Targets (sparse kernels, density 0.1)\n")
        md.append(markdown_table(["target", "measured", "bound", "met"], [[t, f"{v:.3f}", f"{bound}", "yes" if v <= bound else "NO"] for t, v, bound in checks]) + "\n")
    return "\n".join(md)


def plot(args, runs):
    plt = pyplot()

    fig, axes = plt.subplots(len(args.models), 3, figsize=(13, 3.2 * len(args.models)), squeeze=False)
    for row, model in zip(axes, args.models):
        for ax, key, title in zip(row, ("seconds_per_step", "guide_bytes", "train_flops_per_step"), ("seconds / step", "guide-state bytes", "training FLOPs / step")):
            for i, lrt in enumerate((False, True)):
                rows = guide_rows(args)
                vals = [find(runs, model, lrt, d, k)[key] for _, d, k in rows]
                ax.bar([j + 0.4 * i for j in range(len(rows))], vals, width=0.4, label="LRT" if lrt else "weight sampling")
            ax.set_xticks([j + 0.2 for j in range(len(rows))], [n for n, _, _ in rows], fontsize=6, rotation=20)
            ax.set_title(f"{MODELS[model]}: {title}", fontsize=8)
            if key != "seconds_per_step":
                ax.set_yscale("log")
        row[0].legend(fontsize=7)
    save_figure(fig, args, "cost")


def parse_args(argv):
    p = ArgumentParser(description="Cost of dense VI vs SSVI: time, memory, guide state, FLOPs.")
    p.add_argument("--models", default="resnet18,mlp3", help="comma-separated: resnet18, mlp3")
    p.add_argument("--repeats", type=int, default=11, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=3, help="consecutive steps per configuration per round; with more than 1, "
                   "the first of each block (cold caches after the other processes ran) is not among the timed steps")
    p.add_argument("--update-every", type=int, default=4, help="SSVI update period while timing (small, so update steps get timed)")
    p.add_argument("--flops-update-every", type=int, default=100, help="update period the FLOP count amortises the gradient addition over (the recipe's 100)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    p.add_argument("--mlp-width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--baseline-ref", default=None, help="also run SSVI 0.1 with the package at this git commit (a temporary worktree), "
                   "as 'today's SSVI' for the sparse-kernel targets")
    add_replicas_flag(p)
    add_common_flags(p)
    args = p.parse_args(argv)
    if args.baseline_ref is not None:
        ok = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.baseline_ref}^{{commit}}"], cwd=ROOT, capture_output=True)
        if ok.returncode != 0:
            p.error(f"--baseline-ref: {args.baseline_ref!r} is not a commit of this repository")
    args.models = args.models.split(",")
    if set(args.models) - set(MODELS):
        p.error(f"--models: choose from {sorted(MODELS)}")
    if args.repeats < 1 or args.warmup < 0 or args.block < 1 or args.replicas < 1:
        p.error("--repeats, --block and --replicas must be >= 1 and --warmup >= 0")
    if args.update_every < 2:
        p.error("--update-every must be >= 2 (plain steps are timed between update steps)")
    return args


def main(argv=None):
    args = parse_args(argv)

    configs = [
        {"model": m, "density": d, "kernels": k, "lrt": lrt, "repeats": args.repeats, "warmup": args.warmup, "update_every": args.update_every, "flops_update_every": args.flops_update_every, "device": args.device, "width": args.width, "mlp_width": args.mlp_width}
        for m in args.models for lrt in (False, True) for _, d, k in GUIDES
    ]
    if args.baseline_ref:
        configs += [{**c, "kernels": "baseline"} for c in configs if c["density"] == 0.1 and c["kernels"] == "auto"]
    groups = {}
    for c in configs:
        groups.setdefault((c["model"], c["lrt"]), []).append(c)
    runs = run_rounds(list(groups.values()), args, lambda cfgs, progress, tree: run_group(
        cfgs, [tree if c["kernels"] == "baseline" else None for c in cfgs], progress, args.block, args.replicas))
    md = report(args, runs)
    plot(args, runs)
    write_results("cost", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        run_main(main)
