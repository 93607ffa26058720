"""Shared helpers of the benchmark scripts: run records, tables, parallel runs."""

import json
import math
import multiprocessing as mp
import os
import pathlib
import platform
import statistics
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def environment():
    import numpy
    import pyro
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def mean_se(values):
    """Mean and standard error of the mean."""
    values = list(values)
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def mean_std(values):
    values = list(values)
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return m, sd


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_dir(args):
    folder = pathlib.Path(getattr(args, "results_dir", None) or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(name, markdown, data, args):
    """Write <results>/<name>.md and <name>.json (raw numbers, seeds, versions, machine), atomically."""
    folder = results_dir(args)
    payload = {"benchmark": name, "args": {k: v for k, v in vars(args).items()}, "environment": environment(), "results": data}
    for suffix, text in ((".md", markdown.rstrip() + "\n"), (".json", json.dumps(payload, indent=2, default=str))):
        tmp = folder / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / f"{name}{suffix}")
    print(f"wrote {folder / name}.md, .json" + (", .png" if (folder / f"{name}.png").exists() else ""))


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, args, name):
    """Lay out, write <results>/<name>.png and close ``fig``."""
    fig.tight_layout()
    fig.savefig(results_dir(args) / f"{name}.png", dpi=120)
    pyplot().close(fig)


def add_common_flags(parser):
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one torch thread each)")
    parser.add_argument("--results-dir", default=None, help=f"where to write the tables, JSON and plots (default {RESULTS})")


def add_optimizer_reset_flag(parser):
    parser.add_argument(
        "--optimizer-reset", choices=("fresh", "zero"), default="fresh",
        help="SSVI(optimizer_reset=...): refilled slots step like a fresh Adam (fresh, the default) or keep "
        "Adam's shared step count (zero, the previous default, which produced the committed UCI results)",
    )


def _init_worker():
    import torch

    torch.set_num_threads(1)


def run_parallel(fn, tasks, workers, desc):
    """``[fn(t) for t in tasks]`` on ``workers`` processes (one torch thread each), with a progress bar."""
    from tqdm.auto import tqdm

    if workers <= 1:
        _init_worker()
        return [fn(t) for t in tqdm(tasks, desc=desc)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        return list(tqdm(pool.imap(fn, tasks), total=len(tasks), desc=desc))
