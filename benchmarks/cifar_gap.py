"""Where the gap between SSVI 0.1 and dense VI on real CIFAR-10 comes from: width, epochs, sparsity alone, equal
active budget, and the levers the recipe leaves open (per-layer allocation, a dense classifier head, the update
interval, weight sampling instead of local reparameterisation).

    mkdir -p ~/.cache/cifar10-jpeg
    tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C ~/.cache/cifar10-jpeg   # outside the repository
    python benchmarks/cifar_gap.py --dry-run                    # the cells and their commands
    python benchmarks/cifar_gap.py --resume --stop-after 5     # run (or continue) every cell, 5 epochs per call
    python benchmarks/cifar_gap.py --cells levers --resume     # one study's cells only
    python benchmarks/cifar_gap.py --report                    # tables and plots of the finished cells, no training

Every cell is one run of ``examples/cifar_resnet.py`` on the image folder (all 50,000 training and 10,000 test
images) with the recipe's defaults but for the cell's own flags, its JSON and log under ``--runs-dir`` (committed
with the results), its checkpoint (written every epoch) under ``--checkpoint-dir``; a run whose JSON exists is reused, one with a checkpoint only is continued with ``--resume``
(refused without it, so nothing is overwritten). The cells run one after another (``--workers 1``), so that their
epoch times are comparable; the 1-minute load average of the machine is recorded beside every epoch's time.

Studies (a cell can serve several):

* ``width``: deterministic, dense VI and SSVI 0.1 at widths 8 and 16, and dense VI and SSVI 0.1 at width 32, 5 epochs;
* ``budget``: dense VI and SSVI 0.1 at width 8 for 15 epochs (beside the 5-epoch cells);
* ``sparsity``: the deterministic network trained sparse at density 0.1 (magnitude removal, gradient addition on
  SSVI's schedule, RigL: Evci et al. 2020), beside the deterministic network, dense VI and SSVI 0.1;
* ``equal``: SSVI 0.1 at width 24 (about as many active weights as dense VI at width 8) against dense VI at width 8;
* ``levers``: SSVI 0.1 at width 8, 5 epochs, with one change each: ``--allocation erk``, ``--head-dense``,
  ``--update-every`` 50 and 200, ``--no-lrt``; the posterior-mean predictive is reported beside the MC one.

Writes ``results/cifar_gap.{md,json,png}``; ``cifar_gap.json`` holds ``runs``, one record per finished run (method,
density, width, epochs, allocation, lrt, head_dense, update_every, seed, the MC predictive's accuracy, NLL and ECE,
the posterior mean's, shift at severities 3 and 5, active weights, the fastest epoch's seconds and the load beside it,
the median posterior sigma and signal-to-noise ratio per layer), so that the cells can be regrouped. The images are
the JPEG copy of ``../shared/data/cifar10``: compare the cells with each other, not with published CIFAR-10 figures.
"""

import hashlib
import json
import os
import pathlib
import shlex
import statistics
import sys
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from cifar_real import (  # noqa: E402
    BenchmarkError, UsageError, check_data_dir, example_command, metric, run_logged, shift_means, status)
from common import add_common_flags, markdown_table, mean_std, pyplot, save_figure, write_results  # noqa: E402

METHODS = ("deterministic", "deterministic sparse", "dense VI", "SSVI")


class Cell(NamedTuple):
    """One configuration of the example; ``seeds`` runs of it."""

    method: str
    density: float = 1.0
    width: int = 8
    epochs: int = 5
    allocation: str = "uniform"
    lrt: bool = True
    head_dense: bool = False
    update_every: int = 100
    seeds: int = 2

    def flags(self):
        """The example's flags of this cell (the recipe's defaults left out)."""
        out = {"deterministic": ["--deterministic"], "deterministic sparse": ["--deterministic", "--density", str(self.density)],
               "dense VI": ["--density", "1.0"], "SSVI": ["--density", str(self.density)]}[self.method]
        out += ["--width", str(self.width), "--epochs", str(self.epochs)]
        if self.allocation != "uniform":
            out += ["--allocation", self.allocation]
        if not self.lrt and self.method in ("dense VI", "SSVI"):
            out.append("--no-lrt")
        if self.head_dense:
            out.append("--head-dense")
        if self.update_every != 100:
            out += ["--update-every", str(self.update_every)]
        return out

    def tag(self, seed):
        slug = {"deterministic": "det", "deterministic sparse": "detsparse", "dense VI": "dense", "SSVI": "ssvi"}[self.method]
        parts = [slug, f"d{self.density:g}", f"w{self.width}", f"e{self.epochs}", self.allocation,
                 "lrt" if self.lrt else "weights", "headdense" if self.head_dense else "head", f"u{self.update_every}", f"s{seed}"]
        return "-".join(parts)


SSVI01 = Cell("SSVI", 0.1)
#: the studies, each a list of cells, in the order they run (seed 0 of every cell of every study before any seed 1)
STUDIES = {
    "levers": [SSVI01, Cell("dense VI"), SSVI01._replace(head_dense=True), SSVI01._replace(allocation="erk"),
               SSVI01._replace(lrt=False), SSVI01._replace(update_every=50), SSVI01._replace(update_every=200)],
    "sparsity": [Cell("deterministic"), Cell("deterministic sparse", 0.1), Cell("dense VI"), SSVI01],
    "budget": [Cell("dense VI", epochs=15), SSVI01._replace(epochs=15), Cell("dense VI"), SSVI01],
    "width": [Cell("deterministic", width=16), Cell("dense VI", width=16), SSVI01._replace(width=16),
              Cell("dense VI", width=32, seeds=1), SSVI01._replace(width=32, seeds=1)],
    "equal": [SSVI01._replace(width=24, seeds=1), Cell("dense VI")],
}


#: finished runs' JSON and logs: committed, so that a later session reuses them
RUNS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "cifar_gap_runs"


def default_checkpoint_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyro_ssvi", "cifar_gap_checkpoints")


def plan(args):
    """One dict per run of the chosen studies (each distinct cell and seed once): cell, seed, tag, paths."""
    data_key = hashlib.sha256(os.path.abspath(os.path.expanduser(args.data_dir)).encode()).hexdigest()[:8]
    cells = list(dict.fromkeys(c for study in args.cells for c in STUDIES[study]))
    runs = []
    for seed in range(max(c.seeds for c in cells)):
        for cell in cells:
            if seed < min(cell.seeds, args.seeds or cell.seeds):
                tag = f"{cell.tag(seed)}-{data_key}"
                runs.append({"cell": cell, "seed": seed, "tag": tag, "out": os.path.join(args.runs_dir, f"{tag}.json"),
                             "checkpoint": os.path.join(args.checkpoint_dir, f"{tag}.pt")})
    return runs


def command(run, args):
    """The example's command line of one run: the cell's flags, the corruptions at severities 3 and 5."""
    return example_command(run, args, run["cell"].flags(), "3,5")


# the results ------------------------------------------------------------------------------
def record(run):
    """The flat record of one finished run (the fields ``cifar_gap.json`` promises)."""
    r = json.loads(pathlib.Path(run["out"]).read_text())
    cell = run["cell"]
    rec = {"method": cell.method, "density": cell.density, "width": cell.width, "epochs": cell.epochs,
           "allocation": cell.allocation, "lrt": cell.lrt if cell.method in ("dense VI", "SSVI") else False,
           "head_dense": cell.head_dense, "update_every": cell.update_every, "seed": run["seed"], "tag": run["tag"]}
    for m in ("accuracy", "nll", "ece", "brier"):
        rec[m] = metric(r.get(f"test_{m}"))
        pm = (r.get(f"test_{m}") or {}).get("posterior_mean")
        rec[f"posterior_mean_{m}"] = pm
    shifted = shift_means(r)
    rec["shift"] = {s: {k: shifted[s].get(k) for k in ("accuracy", "ece")} for s in ("3", "5") if s in shifted}
    for k in ("active_params", "dense_params", "guide_bytes", "seconds", "train_flops_per_step", "updates"):
        rec[k] = r.get(k)
    epochs = [e for e in r.get("epoch_log", []) if "seconds" in e]
    fastest = min(epochs, key=lambda e: e["seconds"]) if epochs else {}
    rec["epoch_seconds"], rec["epoch_load"] = fastest.get("seconds"), fastest.get("load")
    rec["posterior_scales"] = r.get("posterior_scales")
    rec["finite"] = all(isinstance(rec[m], float) and rec[m] == rec[m] for m in ("accuracy", "nll", "ece"))
    return rec


def _group(records, **match):
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def _fmt(values, scale=1.0, digits=3):
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    m, sd = mean_std(vals)
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(vals) > 1 else "")


def scale_text(rs):
    """Median over the run's Bayesian layers of the per-layer median sigma and SNR (mean over seeds)."""
    sig, snr = [], []
    for r in rs:
        layers = (r.get("posterior_scales") or {}).values()
        if layers:
            sig.append(statistics.median(v["median_sigma"] for v in layers))
            snr.append(statistics.median(v["median_snr"] for v in layers))
    if not sig:
        return "–", "–"
    return f"{statistics.fmean(sig):.2e}", f"{statistics.fmean(snr):.1f}"


HEADER = ["cell", "seeds", "accuracy %", "NLL", "ECE", "mean-pred. acc %", "mean-pred. NLL", "shift acc % s3", "shift acc % s5",
          "active weights", "median sigma", "median SNR", "fastest epoch s", "load"]


def label(cell):
    text = f"{cell.method}" + (f" {cell.density:g}" if cell.method in ("SSVI", "deterministic sparse") else "")
    extras = [f"w{cell.width}", f"{cell.epochs} ep"]
    if cell.allocation != "uniform":
        extras.append(cell.allocation)
    if not cell.lrt:
        extras.append("weight sampling")
    if cell.head_dense:
        extras.append("dense head")
    if cell.update_every != 100:
        extras.append(f"update every {cell.update_every}")
    return text + " (" + ", ".join(extras) + ")"


def row(cell, records):
    rs = _group(records, **{k: getattr(cell, k) for k in ("method", "density", "width", "epochs", "allocation", "head_dense",
                                                          "update_every")}, lrt=cell.lrt and cell.method in ("dense VI", "SSVI"))
    if not rs:
        return None
    sig, snr = scale_text(rs)
    return [label(cell), len(rs), _fmt([r["accuracy"] for r in rs], 100, 2), _fmt([r["nll"] for r in rs]),
            _fmt([r["ece"] for r in rs]), _fmt([r["posterior_mean_accuracy"] for r in rs], 100, 2),
            _fmt([r["posterior_mean_nll"] for r in rs]),
            _fmt([r["shift"].get("3", {}).get("accuracy") for r in rs], 100, 2),
            _fmt([r["shift"].get("5", {}).get("accuracy") for r in rs], 100, 2),
            f"{statistics.fmean(r['active_params'] for r in rs):,.0f}", sig, snr,
            _fmt([r["epoch_seconds"] for r in rs], 1, 0), _fmt([r["epoch_load"] for r in rs], 1, 1)]


def gap(records, ssvi, dense):
    """Accuracy points, NLL and ECE of SSVI minus dense VI (means over seeds); None where either is missing."""
    a, b = _group(records, **ssvi), _group(records, **dense)
    if not a or not b:
        return None
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
    return {"accuracy": 100 * (mean(a, "accuracy") - mean(b, "accuracy")), "nll": mean(a, "nll") - mean(b, "nll"),
            "ece": mean(a, "ece") - mean(b, "ece"), "seeds": (len(a), len(b))}


BASE = {"allocation": "uniform", "head_dense": False, "update_every": 100, "lrt": True}


def gaps(records):
    """The gap of every SSVI cell to dense VI (the recipe's levers) of the same width and epochs; the equal-budget cell
    (width 24) against dense VI at width 8, whose active weights it matches."""
    out = []
    for cell in dict.fromkeys(c for cs in STUDIES.values() for c in cs):
        if cell.method != "SSVI":
            continue
        ssvi = {k: v for k, v in cell._asdict().items() if k != "seeds"}
        dense = {"method": "dense VI", "width": 8 if cell.width == 24 else cell.width, "epochs": cell.epochs, **BASE}
        g = gap(records, ssvi, dense)
        if g is not None:
            out.append({"cell": label(cell), "against": f"dense VI w{dense['width']}", **g})
    return out


def plot(records, args):
    """Gap to dense VI against width, against epochs, and for each lever at width 8 and 5 epochs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (xkey, xs, fixed) in zip(axes[:2], (("width", (8, 16, 32), {"epochs": 5}), ("epochs", (5, 15), {"width": 8}))):
        pts = [(x, gap(records, {"method": "SSVI", "density": 0.1, xkey: x, **fixed, **BASE},
                       {"method": "dense VI", xkey: x, **fixed, **BASE})) for x in xs]
        pts = [(x, g["accuracy"]) for x, g in pts if g is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label="SSVI 0.1 − dense VI")
        ax.axhline(-3, color="grey", ls="--", lw=1, label="target −3 points")
        ax.set_xlabel(xkey)
        ax.set_ylabel("accuracy gap (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    levers = [(c, label(c).split("(", 1)[1].rstrip(")")) for c in STUDIES["levers"] if c.method == "SSVI"]
    bars = [(name, gap(records, {k: v for k, v in c._asdict().items() if k != "seeds"},
                       {"method": "dense VI", "width": 8, "epochs": 5, **BASE})) for c, name in levers]
    bars = [(name.replace("w8, 5 ep", "").strip(", ") or "recipe", g["accuracy"]) for name, g in bars if g is not None]
    if bars:
        axes[2].barh([b[0] for b in bars], [b[1] for b in bars])
    axes[2].axvline(-3, color="grey", ls="--", lw=1)
    axes[2].set_xlabel("accuracy gap (points), width 8, 5 epochs")
    fig.suptitle("SSVI 0.1 against dense VI on CIFAR-10 (JPEG copy), ResNet-18", fontsize=10)
    fig.tight_layout()
    save_figure(fig, args, "cifar_gap")


def report(runs, args):
    records = [record(r) for r in runs if os.path.exists(r["out"])]
    missing = [r["tag"] for r in runs if not os.path.exists(r["out"])]
    parts = ["# Where the gap between SSVI 0.1 and dense VI comes from (real CIFAR-10)\n",
             "`benchmarks/cifar_gap.py`: `examples/cifar_resnet.py` on the JPEG copy of CIFAR-10 (all 50,000 training and "
             "10,000 test images), the recipe's defaults but for each cell's flags. MC predictive (10 draws) unless said; "
             "shift: the ten corruptions of `examples/corruptions.py` on 2000 fixed test images, mean over corruptions; "
             "median sigma / SNR: the median over Bayesian layers of each layer's median posterior standard deviation and "
             "|mu|/sigma over its active weights (the scales start at about 6e-4); fastest epoch with the 1-minute load "
             "average beside it. Mean ± sd over seeds.\n"]
    for study, cells in STUDIES.items():
        rows = [r for r in (row(c, records) for c in dict.fromkeys(cells)) if r is not None]
        if rows:
            parts += [f"## {study}\n", markdown_table(HEADER, rows), ""]
    table = gaps(records)
    if table:
        parts += ["## Gap to dense VI of the same width and epochs\n",
                  markdown_table(["SSVI cell", "against", "seeds (SSVI, dense)", "accuracy points", "NLL", "ECE"],
                                 [[g["cell"], g["against"], f"{g['seeds'][0]}, {g['seeds'][1]}", f"{g['accuracy']:+.2f}", f"{g['nll']:+.3f}",
                                   f"{g['ece']:+.3f}"] for g in table]), ""]
    bad = [r["tag"] for r in records if not r["finite"]]
    if bad:
        parts.append("Non-finite results (reported, not dropped): " + ", ".join(bad))
    if missing:
        parts.append("Not finished yet (continue with `--resume`): " + ", ".join(missing))
    md = "\n".join(parts)
    if records:
        plot(records, args)
    write_results("cifar_gap", md, {"runs": records, "gaps": table, "missing": missing}, args)
    print(md)
    return records


# command line -----------------------------------------------------------------------------
def parse_args(argv):
    p = ArgumentParser(description="Where the gap between SSVI 0.1 and dense VI on real CIFAR-10 comes from: resumable cells.")
    p.add_argument("--data-dir", default="~/.cache/cifar10-jpeg", help="the unpacked image folder (train/<class>, test/<class>), outside the repository")
    p.add_argument("--cells", default=",".join(STUDIES), help=f"comma-separated studies among {', '.join(STUDIES)}")
    p.add_argument("--seeds", type=int, default=None, help="at most N seeds per cell (default: each cell's own, 2 or 1)")
    p.add_argument("--shift-images", type=int, default=2000, help="test images scored under each corruption and severity")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the example's --device")
    p.add_argument("--runs-dir", default=str(RUNS_DIR), help="per-run JSON and logs (the default is committed with the results)")
    p.add_argument("--checkpoint-dir", default=None, help=f"per-run checkpoints, written every epoch (default {default_checkpoint_dir()})")
    p.add_argument("--resume", action="store_true", help="continue the runs that have a checkpoint but no JSON yet")
    p.add_argument("--stop-after", type=int, default=None, help="end every run after N more epochs; continue later with --resume")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, and run nothing")
    p.add_argument("--report", action="store_true", help="write the tables and plot of the finished runs, and run nothing")
    add_common_flags(p)
    p.set_defaults(workers=1)
    args = p.parse_args(argv)
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in args.cells if c not in STUDIES]
    if unknown or not args.cells:
        p.error(f"--cells: unknown study {unknown[0]!r}; known: {', '.join(STUDIES)}" if unknown else "--cells: name at least one study")
    for flag in ("seeds", "stop_after", "shift_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if args.workers != 1:
        p.error("--workers: the cells run one at a time (their epoch times are compared); pass 1")
    args.runs_dir = os.path.abspath(os.path.expanduser(args.runs_dir))
    args.checkpoint_dir = os.path.abspath(os.path.expanduser(args.checkpoint_dir or default_checkpoint_dir()))
    if not (args.dry_run or args.report):
        check_data_dir(p, args.data_dir)
        os.makedirs(args.runs_dir, exist_ok=True)
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    states = {r["tag"]: status(r, args) for r in runs}
    todo = [r for r in runs if states[r["tag"]] != "done"]
    if args.dry_run:
        for r in runs:
            print(f"# {r['tag']}: done" if states[r["tag"]] == "done" else shlex.join(command(r, args))
                  + (" (blocked: checkpoint exists, pass --resume)" if states[r["tag"]] == "blocked" else ""))
        return runs
    if args.report:
        return report(runs, args)
    blocked = [r["checkpoint"] for r in todo if states[r["tag"]] == "blocked"]
    if blocked:
        raise UsageError(f"{len(blocked)} run(s) have a checkpoint but no result, e.g. {blocked[0]}: pass --resume to continue them, or delete the checkpoints")
    failures = []
    for i, r in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {r['tag']}", flush=True)
        failure = run_logged(command(r, args), os.path.join(args.runs_dir, f"{r['tag']}.log"), r["tag"])
        if failure:
            failures.append(failure)
        report(runs, args)  # the results so far, after every run
    records = report(runs, args)
    if failures:
        raise BenchmarkError(f"{len(failures)} of {len(todo)} runs failed; first: {failures[0]}")
    return records


if __name__ == "__main__":
    run_main(main, usage_errors=(UsageError,), runtime_errors=(BenchmarkError,))
