"""The cost of being Bayesian: seconds per training step of a BNN over the same network trained deterministically.

    python benchmarks/bayes_cost.py                                   # ResNet-18 width 16 and the MLP, CPU
    python benchmarks/bayes_cost.py --models resnet18 --widths 64 --configs det,ssvi0.1-w,ssvi0.1-lrt
    python benchmarks/bayes_cost.py --quick                           # a smoke run with tiny networks

For each network (CIFAR ResNet-18, ``pyro_ssvi.models.ResNet18`` on 3x32x32 input, at each of
``--widths``; an MLP 784-1024-1024-10), batch ``--batch`` (128):

* ``deterministic``: the ``nn.Module`` itself, ``torch.optim.SGD`` on cross-entropy, no Pyro (``det-cl``,
  not run by default: the same in ``channels_last`` memory format, about 0.75x on this CPU, but torch
  2.14.1's CPU backward of channels-last convolutions corrupted the heap on some shape sequences here,
  which is why LRT keeps NCHW);
* the same module through :func:`~pyro_ssvi.models.bayesianize` and
  :class:`~pyro_ssvi.models.BayesianClassifier`, ``TraceMeanField_ELBO``, Adam: SSVI at densities
  0.1 and 0.05 (:class:`~pyro_ssvi.SparseSubspaceGuide`, :class:`~pyro_ssvi.SSVI`, no subspace
  update during timing), our guide at density 1, and Pyro's ``AutoNormal`` (``pyro.infer.SVI``),
  each with weight sampling and with local reparameterisation (LRT; Kingma, Salimans, Welling 2015);
* ``...-fast``: SSVI 0.1 (weights, LRT) and AutoNormal (weights) with the README's fast settings:
  ``pyro.enable_validation(False)`` and one ``torch.optim.Adam(..., fused=True)`` over every parameter in
  place of ``pyro.optim.Adam``'s optimiser per parameter.

Each configuration runs in its own process (so the global Pyro parameter store and the memory
accounting are its own); the configurations of one network are stepped in rounds of ``--block``
consecutive steps each, in a rotating order, exactly as ``cost.py`` does (its ``run_group``): the
first step of a block, after the other processes ran, is timed apart as cold; the median of the
other ``--repeats`` steps is the figure. ``--replicas N`` runs each configuration in N processes and
pools their steps: on a shared machine a process's speed varies by several percent for its whole
life, which rotating rounds cannot average out. The table gives each median over the deterministic one of
the same run. A profile of one SSVI LRT step (``torch.profiler``, operators' self time aggregated
into categories: forward convolutions, variance path, noise, LRT output, backward, guide,
optimiser, and the Python left over: Pyro's tracing, handlers and torch-function interception)
follows. Writes results/bayes_cost.{md,json,png}.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if os.environ.get("PYRO_SSVI_BAYES_PACKAGE"):  # a --serve worker for the --baseline-ref commit: its package first
    sys.path.insert(0, os.environ["PYRO_SSVI_BAYES_PACKAGE"])

try:
    from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
except ImportError:  # a --baseline-ref commit from before the helpers moved to pyro_ssvi.scripts
    from pyro_ssvi.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402
from cost import Worker, add_replicas_flag, median, run_group, run_rounds  # noqa: E402

#: configuration key -> (column name, guide: None (deterministic) / "autonormal" / density, LRT, fast settings)
CONFIGS = {
    "det": ("deterministic", None, False, False),
    "det-cl": ("deterministic, channels_last", "channels_last", False, False),
    "ssvi0.1-w": ("SSVI 0.1 weights", 0.1, False, False),
    "ssvi0.1-lrt": ("SSVI 0.1 LRT", 0.1, True, False),
    "ssvi0.05-w": ("SSVI 0.05 weights", 0.05, False, False),
    "ssvi0.05-lrt": ("SSVI 0.05 LRT", 0.05, True, False),
    "dense-w": ("ours, density 1, weights", 1.0, False, False),
    "dense-lrt": ("ours, density 1, LRT", 1.0, True, False),
    "autonormal-w": ("AutoNormal weights", "autonormal", False, False),
    "autonormal-lrt": ("AutoNormal LRT", "autonormal", True, False),
    "ssvi0.1-w-fast": ("SSVI 0.1 weights, fast settings", 0.1, False, True),
    "ssvi0.1-lrt-fast": ("SSVI 0.1 LRT, fast settings", 0.1, True, True),
    "autonormal-w-fast": ("AutoNormal weights, fast settings", "autonormal", False, True),
}

#: (network, configuration, bound on its ratio to the deterministic step): the issue's targets
TARGETS = [
    ("resnet18-w16", "ssvi0.1-lrt", 1.9), ("resnet18-w64", "ssvi0.1-lrt", 1.7), ("resnet18-w16", "ssvi0.1-w", 1.05),
    ("mlp", "ssvi0.1-lrt", 1.4), ("mlp", "ssvi0.1-w", 1.1),
]
#: each target is also checked for the configuration with the README's fast settings
TARGETS += [(net, f"{c}-fast", bound) for net, c, bound in TARGETS if f"{c}-fast" in CONFIGS]

#: profile categories, in the order of the table
CATEGORIES = [
    "forward: convolutions / linear (mean path)", "forward: LRT variance product (x^2, f(x^2, sigma^2))",
    "forward: LRT noise", "forward: LRT output (sqrt, fused output)", "forward: other (batch norm, relu, loss...)",
    "backward: convolutions / linear", "backward: elementwise and other", "guide (sampling, KL)", "optimiser (Adam)",
    "Python (Pyro tracing, handlers, torch-function interception)",
]
_PRODUCTS = ("conv", "linear", "addmm", "mm", "bmm", "matmul", "embedding_bag", "sampled_addmm", "einsum")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def network_name(model, width):
    return f"resnet18-w{width}" if model == "resnet18" else "mlp"


def build_module(cfg):
    """The plain ``nn.Module`` and a batch ``(x, y)`` of the configuration's network."""
    import torch
    import torch.nn as nn

    from pyro_ssvi.models import ResNet18

    if cfg["model"] == "resnet18":
        net = ResNet18(num_classes=10, width=cfg["width"])
        x = torch.randn(cfg["batch"], 3, 32, 32)
    else:
        h = cfg["mlp_width"]
        net = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
        x = torch.randn(cfg["batch"], 784)
    return net, x, torch.randint(0, 10, (cfg["batch"],))


class Deterministic:
    """The baseline step: forward, cross-entropy, backward, ``torch.optim.SGD`` (``channels_last``: the
    network and its input in that memory format, the layout LRT's convolutions use)."""

    def __init__(self, net, channels_last=False):
        import torch

        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.net, self.opt = net, torch.optim.SGD(net.parameters(), lr=1e-3)

    def __call__(self, x, y):
        import torch.nn.functional as F

        import torch

        self.opt.zero_grad(set_to_none=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()


class Bayesian:
    """One SVI / SSVI step of the bayesianized network.

    ``fast``: the README's fast settings, ``pyro.enable_validation(False)`` (this process only) and one
    ``torch.optim.Adam(..., fused=True)`` over every parameter instead of ``pyro.optim.Adam``'s
    optimiser per parameter (for AutoNormal, which ``pyro.infer.SVI`` cannot step with a
    ``torch.optim`` optimiser, through the ``ELBOModule`` that ``elbo(model, guide)`` returns)."""

    def __init__(self, net, guide_kind, lrt, x, y, fast=False):
        import pyro
        import torch
        from pyro.infer.autoguide import AutoNormal

        from pyro_ssvi import SSVI, LocalReparameterizationMessenger, SparseSubspaceGuide
        from pyro_ssvi.models import BayesianClassifier, bayesianize

        if fast:
            pyro.enable_validation(False)
        self.model = BayesianClassifier(bayesianize(net), num_data=50000)
        self.model.to(x.device)
        dense_sites = tuple(f"net.{s}" for s in getattr(net, "dense_sites", ()))
        elbo = pyro.infer.TraceMeanField_ELBO()
        self.lrt, self.elbo_module = None, None
        if guide_kind == "autonormal":
            self.guide = AutoNormal(self.model, init_scale=1e-3)
            self.lrt = LocalReparameterizationMessenger() if lrt else None
        else:
            self.guide = SparseSubspaceGuide(self.model, density=guide_kind, dense_sites=dense_sites, init_scale=1e-3)
        self.guide(x, y)  # set up: the parameters exist
        if fast:
            self.elbo_module = elbo(self.model, self.guide)
            self.optim = torch.optim.Adam(self.elbo_module.parameters(), lr=1e-3, fused=True)
        else:
            self.optim = pyro.optim.Adam({"lr": 1e-3})
        if guide_kind == "autonormal":
            self.svi = None if fast else pyro.infer.SVI(self.model, self.guide, self.optim, elbo)
        else:  # no subspace update while timing: the figure is the plain step
            self.svi = SSVI(self.model, self.guide, self.optim, elbo, total_steps=10**9, update_every=10**8,
                            local_reparameterization=lrt)

    def __call__(self, x, y):
        with self.lrt if self.lrt is not None else contextlib.nullcontext():
            if self.svi is not None:
                self.svi.step(x, y)
            else:  # AutoNormal with a torch.optim optimiser: Pyro's ELBOModule training loop
                self.optim.zero_grad()
                self.elbo_module(x, y).backward()
                self.optim.step()


class Config:
    """One configuration in this process, answering cost.py's worker protocol (``step``, ``report``)."""

    def __init__(self, cfg):
        import pyro
        import torch

        torch.set_num_threads(cfg["threads"])
        torch.manual_seed(0)
        pyro.set_rng_seed(0)
        self.cfg, self.device = cfg, torch.device(cfg["device"])
        net, x, y = build_module(cfg)
        net, self.x, self.y = net.to(self.device), x.to(self.device), y.to(self.device)
        _, guide_kind, lrt, fast = CONFIGS[cfg["config"]]
        if guide_kind in (None, "channels_last"):
            self.run = Deterministic(net, channels_last=guide_kind == "channels_last")
        else:
            self.run = Bayesian(net, guide_kind, lrt, self.x, self.y, fast=fast)
        self.times, self.cold_times, self.steps = [], [], 0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, cold=False):
        self._sync()
        t0 = time.perf_counter()
        self.run(self.x, self.y)
        self._sync()
        dt = time.perf_counter() - t0
        self.steps += 1
        if self.steps > self.cfg["warmup"]:
            (self.cold_times if cold else self.times).append(dt)
        return dt, False

    def report(self):
        import resource

        import torch

        out = {**self.cfg, "seconds_per_step": median(self.times), "seconds_all": sorted(self.times),
               "cold_seconds_per_step": median(self.cold_times)}
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        else:
            out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.cfg.get("profile_steps"):
            out["profile"] = self.profile(self.cfg["profile_steps"])
        return out

    # profile ------------------------------------------------------------------------
    def _labelled(self):
        """Label the guide's forward and the optimiser's step for the profiler (hooks, profiling only)."""
        from torch.autograd.profiler import record_function

        run, stack = self.run, contextlib.ExitStack()
        if not isinstance(run, Bayesian):
            return stack
        enter, leave = _span("bayes_cost.guide")
        for hook in (run.guide.register_forward_pre_hook(enter), run.guide.register_forward_hook(leave)):
            stack.callback(hook.remove)
        optim = run.optim
        if hasattr(optim, "register_step_pre_hook"):  # a torch.optim optimiser (the fast settings)
            enter, leave = _span("bayes_cost.optimizer")
            for hook in (optim.register_step_pre_hook(enter), optim.register_step_post_hook(leave)):
                stack.callback(hook.remove)
            return stack
        call = type(optim).__call__

        class Labelled(type(optim)):
            def __call__(self, *args, **kwargs):
                with record_function("bayes_cost.optimizer"):
                    return call(self, *args, **kwargs)

        cls = optim.__class__
        optim.__class__ = Labelled
        stack.callback(setattr, optim, "__class__", cls)
        return stack

    def profile(self, steps):
        """Seconds per step by category (:data:`CATEGORIES`) over ``steps`` profiled steps."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with self._labelled(), profile(activities=activities) as prof:
            self._sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                self.run(self.x, self.y)
            self._sync()
            wall = time.perf_counter() - t0
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for event in prof.events():
            if event.self_cpu_time_total > 0:
                totals[categorise(event)] += event.self_cpu_time_total * 1e-6
        ops = sum(totals.values())
        totals[CATEGORIES[-1]] = max(wall - ops, 0.0)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        return {"steps": steps, "wall_s": wall / steps, "categories": {k: v / steps for k, v in totals.items()}, "top_ops": table}


def _span(label):
    """``(enter, leave)``: hooks that open and close a profiler span named ``label`` around a call."""
    from torch.autograd.profiler import record_function

    spans = []

    def enter(*_):
        spans.append(record_function(label))
        spans[-1].__enter__()

    def leave(*_):
        spans.pop().__exit__(None, None, None)

    return enter, leave


def _ancestors(event):
    while event is not None:
        yield event.name
        event = event.cpu_parent


def categorise(event):
    """The :data:`CATEGORIES` entry of one profiled operator (by its name and its enclosing labels)."""
    names = list(_ancestors(event))
    op = event.name.lower()
    if any(n == "bayes_cost.optimizer" for n in names):
        return "optimiser (Adam)"
    if any(n.startswith("autograd::engine::evaluate_function") for n in names):
        if any(p in op for p in _PRODUCTS) or any("Convolution" in n or "Mm" in n for n in names[:3]):
            return "backward: convolutions / linear"
        return "backward: elementwise and other"
    if any(n == "bayes_cost.guide" for n in names):
        return "guide (sampling, KL)"
    if any(n == "lrt.variance" for n in names):
        return "forward: LRT variance product (x^2, f(x^2, sigma^2))"
    if "normal" in op or "randn" in op:
        return "forward: LRT noise"
    if any(n == "lrt.output" for n in names):
        return "forward: LRT output (sqrt, fused output)"
    if any(p in op for p in _PRODUCTS):
        return "forward: convolutions / linear (mean path)"
    return "forward: other (batch norm, relu, loss...)"


def serve(cfg):
    """Worker process: set up ``cfg``, then answer ``step`` / ``cold step`` / ``report`` lines with JSON lines."""
    config = Config(cfg)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() in ("step", "cold step"):
            dt, _ = config.step(cold=line.strip() == "cold step")
            print(json.dumps({"seconds": dt, "update": False, "timed": len(config.times)}), flush=True)
        elif line.strip() == "report":
            print(json.dumps(config.report()), flush=True)
            return


class BayesWorker(Worker):
    """cost.py's worker (one configuration per process, driven one step at a time) running this script."""

    def __init__(self, cfg, package_root=None):
        env = dict(os.environ)
        if package_root is not None:  # the package as it is in another tree (the --baseline-ref commit)
            env["PYRO_SSVI_BAYES_PACKAGE"] = str(package_root)
        self.cfg = cfg
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_network(cfgs, progress, block, tree=None, replicas=1):
    """cost.py's ``run_group`` (rotating rounds of ``block`` steps each, ``replicas`` processes per
    configuration) with this script's workers; configurations marked ``baseline`` run the package of ``tree``."""
    import cost

    original, cost.Worker = cost.Worker, BayesWorker
    try:
        return run_group(cfgs, [tree if c.get("baseline") else None for c in cfgs], progress, block, replicas)
    finally:
        cost.Worker = original


# report ------------------------------------------------------------------------------
def key(r):
    """A run's column: its configuration, ``@ref`` when it ran the package at ``--baseline-ref``."""
    return r["config"] + (f"@{r['baseline']}" if r.get("baseline") else "")


def column(k):
    config, _, ref = k.partition("@")
    return CONFIGS[config][0] + (f" at {ref}" if ref else "")


def ratios(runs, statistic="seconds_per_step"):
    """``{network: {column key: seconds / deterministic seconds}}`` from one run's reports; ``statistic``
    ``"seconds_all"`` compares the fastest steps."""

    def value(r):
        return r[statistic][0] if statistic == "seconds_all" else r[statistic]

    out = {}
    for r in runs:
        net = network_name(r["model"], r["width"])
        base = next((b for b in runs if network_name(b["model"], b["width"]) == net and key(b) == "det"), None)
        if base is not None:
            out.setdefault(net, {})[key(r)] = value(r) / value(base)
    return out


def report(args, runs):
    configs = list(dict.fromkeys(key(r) for r in runs))
    by = {(network_name(r["model"], r["width"]), key(r)): r for r in runs}
    nets = list(dict.fromkeys(network_name(r["model"], r["width"]) for r in runs))
    rel = ratios(runs)
    md = ["# The cost of being Bayesian: seconds per step over the deterministic step\n"]
    md.append(
        f"Device: {args.device}, {args.threads} torch threads per process, batch {args.batch}. Each configuration in "
        + (f"{args.replicas} processes of its own (their timed steps pooled); " if args.replicas > 1 else "its own process; ")
        + f"those of one network stepped in rotating rounds of {args.block} consecutive steps (the first of each "
        f"block timed apart as cold), median of {args.repeats} timed steps after {args.warmup} warm-up steps. "
        "Deterministic: the nn.Module with torch.optim.SGD on cross-entropy. Bayesian: bayesianize + BayesianClassifier, "
        "TraceMeanField_ELBO, Adam; SSVI without subspace updates while timing. Cells: ms per step (x deterministic, "
        "measured in this run).\n"
    )
    rows = []
    for net in nets:
        row = [net]
        for c in configs:
            r = by.get((net, c))
            row.append(f"{r['seconds_per_step'] * 1e3:.1f} ({rel[net][c]:.2f}x)" if r is not None and net in rel else "")
        rows.append(row)
    md.append(markdown_table(["network"] + [column(c) for c in configs], rows) + "\n")
    fast = ratios(runs, "seconds_all")
    md.append("Fastest step of each configuration (the one least disturbed by other processes on a shared machine; "
              "ms, x the deterministic fastest step):\n")
    rows = [[net] + [f"{by[(net, c)]['seconds_all'][0] * 1e3:.1f} ({fast[net][c]:.2f}x)" if (net, c) in by and net in fast else ""
                     for c in configs] for net in nets]
    md.append(markdown_table(["network"] + [column(c) for c in configs], rows) + "\n")
    checks = [(net, c, bound) for net, c, bound in TARGETS if net in rel and c in rel[net]]
    if checks:
        ref = getattr(args, "baseline_ref", None)
        md.append("## Targets (median; fastest step in brackets)\n")

        def cell(net, k):
            if k not in rel[net]:  # not run at the baseline (the fast settings)
                return "-"
            return f"{rel[net][k]:.2f} ({fast[net][k]:.2f})"

        md.append(markdown_table(
            ["network", "configuration", "x deterministic"] + ([f"at {ref}"] if ref else []) + ["bound", "met"],
            [[net, CONFIGS[c][0], cell(net, c)] + ([cell(net, f"{c}@{ref}")] if ref else [])
             + [f"{bound}", "yes" if rel[net][c] <= bound else "NO"] for net, c, bound in checks],
        ) + "\n")
    for r in runs:
        if "profile" in r:
            p = r["profile"]
            net = network_name(r["model"], r["width"])
            md.append(f"## Where a {column(key(r))} step goes: {net} ({p['steps']} profiled steps, "
                      f"{p['wall_s'] * 1e3:.1f} ms per step under the profiler)\n")
            md.append(markdown_table(["category", "ms / step", "share"], [
                [k, f"{v * 1e3:.1f}", f"{v / p['wall_s']:.0%}"] for k, v in p["categories"].items()
            ]) + "\n")
    return "\n".join(md)


def plot(args, runs):
    plt = pyplot()
    rel = ratios(runs)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    configs = list(dict.fromkeys(k for v in rel.values() for k in v))
    step = 0.8 / max(len(rel), 1)
    for i, (net, vals) in enumerate(rel.items()):
        ax.bar([j + i * step for j in range(len(configs))], [vals.get(c, 0) for c in configs], width=step, label=net)
    ax.axhline(1.0, color="k", lw=0.7)
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(configs))], [column(c) for c in configs], fontsize=7, rotation=20)
    ax.set_ylabel("x deterministic step")
    ax.set_title(f"Seconds per step over the deterministic step ({args.device}, batch {args.batch})", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, args, "bayes_cost")


def parse_args(argv):
    p = ArgumentParser(description="Seconds per step of BNNs (SSVI, AutoNormal) over the deterministic network.")
    p.add_argument("--models", default="resnet18,mlp", help="comma-separated: resnet18, mlp")
    p.add_argument("--widths", default="16", help="comma-separated ResNet-18 base widths (16, 64)")
    p.add_argument("--configs", default=",".join(c for c in CONFIGS if c != "det-cl"), help=f"comma-separated, from {', '.join(CONFIGS)} (det is always run)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=4, help="consecutive steps per configuration per round (the first timed apart as cold)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each configuration's process")
    p.add_argument("--mlp-width", type=int, default=1024)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled SSVI 0.1 LRT steps per network (0: no profile)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--baseline-ref", default=None, help="also run the SSVI 0.1 configurations with the package at this git "
                   "commit (a temporary worktree), side by side: before / after in one run")
    p.add_argument("--quick", action="store_true", help="smoke run: ResNet-18 width 2 at batch 8, MLP width 16, 2 repeats")
    add_replicas_flag(p)
    add_common_flags(p)
    args = p.parse_args(argv)
    if args.baseline_ref is not None:
        ok = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.baseline_ref}^{{commit}}"], cwd=ROOT, capture_output=True)
        if ok.returncode != 0:
            p.error(f"--baseline-ref: {args.baseline_ref!r} is not a commit of this repository")
    args.models = args.models.split(",")
    if set(args.models) - {"resnet18", "mlp"}:
        p.error("--models: choose from mlp, resnet18")
    try:
        args.widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths: expected comma-separated integers, got {args.widths!r}")
    args.configs = ["det"] + [c for c in args.configs.split(",") if c != "det"]
    if set(args.configs) - set(CONFIGS):
        p.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if args.quick:
        args.widths, args.batch, args.mlp_width, args.repeats, args.warmup, args.block, args.profile_steps = [2], 8, 16, 2, 1, 2, 1
    if min(args.widths) < 1 or min(args.batch, args.repeats, args.block, args.threads, args.replicas) < 1 or args.warmup < 0:
        p.error("--widths, --batch, --repeats, --block, --threads and --replicas must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)

    networks = [(m, w) for m in args.models for w in (args.widths if m == "resnet18" else [0])]
    common = {"repeats": args.repeats, "warmup": args.warmup, "device": args.device, "batch": args.batch,
              "threads": args.threads, "mlp_width": args.mlp_width}
    groups = []
    for m, w in networks:
        cfgs = [{**common, "model": m, "width": w, "config": c, "profile_steps": args.profile_steps if c in ("ssvi0.1-lrt", "ssvi0.1-lrt-fast") else 0}
                for c in args.configs]
        if args.baseline_ref:
            cfgs += [{**c, "baseline": args.baseline_ref, "profile_steps": 0} for c in cfgs if c["config"] in ("ssvi0.1-w", "ssvi0.1-lrt")]
        groups.append(cfgs)
    runs = run_rounds(groups, args, lambda cfgs, progress, tree: run_network(cfgs, progress, args.block, tree, args.replicas))
    md = report(args, runs)
    plot(args, runs)
    write_results("bayes_cost", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        run_main(main)
