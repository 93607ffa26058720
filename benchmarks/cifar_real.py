"""The CIFAR example on the real CIFAR-10 images (a JPEG copy): deterministic, dense VI, SSVI 0.1 and 0.05, and SSVI 0.1
fine-tuned from the deterministic network.

    mkdir -p ~/.cache/cifar10-jpeg
    tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C ~/.cache/cifar10-jpeg   # outside the repository
    python benchmarks/cifar_real.py --data-dir ~/.cache/cifar10-jpeg --dry-run       # the commands only
    python benchmarks/cifar_real.py --data-dir ~/.cache/cifar10-jpeg --workers 1     # on a GPU: hours
    python benchmarks/cifar_real.py ... --stop-after 2      # time-limited jobs: 2 epochs per run, then
    python benchmarks/cifar_real.py ... --resume            # continue the runs that have a checkpoint

Each configuration runs ``examples/cifar_resnet.py`` in a subprocess with the recipe's
defaults (local reparameterisation, prior N(0, 0.005^2), KL weight 0.01 warmed up over the
first half, cosine learning rate over the run's epochs) at ``--width`` and ``--epochs``,
``--dataset folder --data-dir DIR --shift all --mc-samples 10`` (the corruptions at
``--shift-severities``, default 3 and 5, on ``--shift-images`` fixed test images, default 2000), writing its JSON and its
checkpoint under ``--runs-dir``. Methods and default seeds: deterministic (``--deterministic``,
1 seed), dense VI (``--density 1.0``, 2 seeds), SSVI 0.1 (2 seeds) and SSVI 0.05 (1 seed);
``--seeds N`` gives every method N seeds; SSVI 0.1 fine-tuned (``--init-from`` the deterministic run of
its seed: the magnitude subspace at the trained weights) for ``--finetune-epochs``, after the others,
its minutes counting the deterministic run's too, so that it is compared with SSVI from scratch at
equal total training time. A run whose JSON exists is reused; one with a
checkpoint but no JSON (stopped by ``--stop-after`` or killed) is continued with ``--resume``
and refused without it, so nothing is silently overwritten.

The table (mean ± sd over seeds) shows test accuracy, NLL, ECE, Brier score and AURC of the
MC predictive (the plain network's values for the deterministic one), accuracy and ECE under
the CIFAR-10-C-style corruptions of ``examples/corruptions.py`` averaged over corruptions at
severities 3 and 5, active weights, guide bytes, training minutes (the fine-tuned row's include its
deterministic start), the fastest epoch's seconds (the least disturbed by other work on the
machine; the fine-tuned row's own epochs) and counted FLOPs per step;
the plot shows accuracy and ECE against severity (0 = clean). Writes
results/cifar_real.{md,json,png}. The images are the JPEG copy of
``../shared/data/cifar10`` (quality 75), so compare the methods with each other, not with
published CIFAR-10 figures.
"""

import hashlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, mean_std, pyplot, save_figure, write_results  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar_resnet.py"

#: method key -> (label, flags of the example, default number of seeds)
METHODS = {
    "deterministic": ("deterministic", ["--deterministic"], 1),
    "dense": ("dense VI", ["--density", "1.0"], 2),
    "ssvi0.1": ("SSVI 0.1", ["--density", "0.1"], 2),
    "ssvi0.05": ("SSVI 0.05", ["--density", "0.05"], 1),
    # started from the deterministic run of the same seed (--init-from: the magnitude subspace at the trained
    # weights), trained for --finetune-epochs; its minutes in the table include the deterministic run's
    "ssvi0.1-ft": ("SSVI 0.1 fine-tuned from deterministic", ["--density", "0.1"], 1),
}
#: methods that start from another method's checkpoint of the same seed
STARTS_FROM = {"ssvi0.1-ft": "deterministic"}
SEVERITIES = ("1", "2", "3", "4", "5")
TEST_METRICS = ("accuracy", "nll", "ece", "brier", "aurc")


class BenchmarkError(RuntimeError):
    """A run failed; reported in one line (exit 1)."""


class UsageError(Exception):
    """Something the user can fix by changing the command (exit 2)."""


def default_runs_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyro_ssvi", "cifar_real_runs")


# the runs ---------------------------------------------------------------------------------
def plan(args):
    """One dict per run: method, seed, tag and the paths of its JSON and checkpoint."""
    data_key = hashlib.sha256(os.path.abspath(os.path.expanduser(args.data_dir)).encode()).hexdigest()[:8]
    runs = []
    seeds = {key: args.seeds if args.seeds is not None else METHODS[key][2] for key in args.methods}
    # seed 0 of every method first: a partial benchmark already compares all methods
    for seed, key in [(s, k) for s in range(max(seeds.values())) for k in args.methods if s < seeds[k]]:
        label = METHODS[key][0]
        epochs = args.finetune_epochs if key in STARTS_FROM else args.epochs
        tag = f"{key}-w{args.width}-e{epochs}-s{seed}-{data_key}"
        runs.append({"method": label, "key": key, "seed": seed, "tag": tag,
                     "out": os.path.join(args.runs_dir, f"{tag}.json"), "checkpoint": os.path.join(args.runs_dir, f"{tag}.pt")})
    for run in runs:  # a fine-tuned run starts from the deterministic run of its seed (planned above it)
        if run["key"] in STARTS_FROM:
            base = next((r for r in runs if r["key"] == STARTS_FROM[run["key"]] and r["seed"] == run["seed"]), None)
            if base is None:
                tag = f"{STARTS_FROM[run['key']]}-w{args.width}-e{args.epochs}-s{run['seed']}-{data_key}"
                base = {"key": STARTS_FROM[run["key"]], "seed": run["seed"], "tag": tag,
                        "out": os.path.join(args.runs_dir, f"{tag}.json"), "checkpoint": os.path.join(args.runs_dir, f"{tag}.pt")}
            run["starts_from"] = base
    return runs


def example_command(run, args, flags, severities):
    """The example's command line for ``run`` (its seed, JSON and checkpoint) with the method's ``flags``:
    the image folder, the corruptions at ``severities``, 10 MC draws; ``--resume`` when its checkpoint exists
    and ``--resume`` was asked, and ``--stop-after`` when given."""
    cmd = [sys.executable, str(SCRIPT), "--dataset", "folder", "--data-dir", os.path.abspath(os.path.expanduser(args.data_dir)),
           *flags, "--seed", str(run["seed"]), "--shift", "all", "--shift-severities", severities,
           "--shift-images", str(args.shift_images), "--mc-samples", "10", "--device", args.device, "--no-progress",
           "--out", run["out"], "--checkpoint", run["checkpoint"]]
    if args.resume and os.path.exists(run["checkpoint"]):
        cmd.append("--resume")
    if args.stop_after is not None:
        cmd += ["--stop-after", str(args.stop_after)]
    return cmd


def command(run, args):
    """The example's command line of one run (:func:`example_command` with the method's flags)."""
    flags = [*METHODS[run["key"]][1], "--width", str(args.width),
             "--epochs", str(args.finetune_epochs if "starts_from" in run else args.epochs)]
    if "starts_from" in run:
        flags += ["--init-from", run["starts_from"]["checkpoint"]]
    return example_command(run, args, flags, args.shift_severities)


def status(run, args):
    """``done`` (JSON there: reused), ``resume``, ``blocked`` (a checkpoint but no --resume) or ``new``."""
    if os.path.exists(run["out"]):
        return "done"
    if os.path.exists(run["checkpoint"]):
        return "resume" if args.resume else "blocked"
    return "new"


def run_logged(cmd, log, tag):
    """Run ``cmd`` with its output appended to the file ``log``; returns None or a one-line failure naming ``tag``."""
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if res.returncode != 0:
        lines = pathlib.Path(log).read_text().strip().splitlines()
        return f"run {tag} failed (exit {res.returncode}): {lines[-1] if lines else ''} (log: {log})"
    return None


def execute(run, args):
    """Run one configuration, its output appended to ``<tag>.log`` beside the JSON; returns None or a failure line."""
    return run_logged(command(run, args), os.path.join(args.runs_dir, f"{run['tag']}.log"), run["tag"])


# the results ------------------------------------------------------------------------------
def metric(value):
    """The MC predictive's value of a ``{"mc": v, "posterior_mean": v}`` entry, else the single value
    (a ``--deterministic`` run writes ``{"network": v}``)."""
    if isinstance(value, dict):
        if "mc" in value:
            return value["mc"]
        if len(value) == 1:
            return next(iter(value.values()))
        return value.get("posterior_mean")
    return value


def shift_means(result):
    """``{severity: {"accuracy", "nll", "ece"}}`` of the MC predictive (else the only one), averaged over corruptions."""
    shift = result.get("shift") or {}
    kind = "mc" if "mc" in shift else next(iter(shift), None)
    return (shift.get(kind) or {}).get("mean", {}) if kind else {}


def record(run):
    """The numbers of one finished run, read from its JSON."""
    r = json.loads(pathlib.Path(run["out"]).read_text())
    rec = {"method": run["method"], "key": run["key"], "seed": run["seed"], "tag": run["tag"]}
    rec.update({m: metric(r.get(f"test_{m}")) for m in TEST_METRICS})
    shifted = shift_means(r)
    rec["shift"] = {s: {k: shifted[s].get(k) for k in ("accuracy", "nll", "ece")} for s in SEVERITIES if s in shifted}
    for k in ("active_params", "dense_params", "guide_bytes", "seconds", "train_flops_per_step"):
        rec[k] = r.get(k)
    # the fastest epoch: the least disturbed by other work on the machine (every epoch does the same work)
    epoch_seconds = [e["seconds"] for e in r.get("epoch_log", []) if "seconds" in e]
    rec["epoch_seconds"] = min(epoch_seconds) if epoch_seconds else None
    base = run.get("starts_from")
    if base is not None and rec["seconds"] is not None and os.path.exists(base["out"]):  # total training time
        rec["seconds"] += json.loads(pathlib.Path(base["out"]).read_text()).get("seconds") or 0.0
    return rec


def _fmt(values, scale=1.0, digits=3, unit=""):
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    m, sd = mean_std(vals)
    return f"{m:.{digits}f}{unit}" + (f" ± {sd:.{digits}f}" if len(vals) > 1 else "")


def _fmt_int(values, sci=False):
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m, sd = mean_std(vals)
    if sci:
        return f"{m:.3g}" + (f" ± {sd:.2g}" if len(vals) > 1 and sd > 0 else "")
    return f"{m:,.0f}" + (f" ± {sd:,.0f}" if len(vals) > 1 and sd > 0 else "")


HEADER = ["method", "seeds", "accuracy %", "NLL", "ECE", "Brier", "AURC", "shift acc % s3", "shift ECE s3",
          "shift acc % s5", "shift ECE s5", "active weights", "guide bytes", "train min", "fastest epoch s", "FLOPs / step"]


def table_rows(records, methods):
    rows = []
    for key in methods:
        rs = [r for r in records if r["key"] == key]
        if not rs:
            continue

        def sh(s, k):
            return [r["shift"].get(s, {}).get(k) for r in rs]

        rows.append([
            METHODS[key][0], len(rs), _fmt([r["accuracy"] for r in rs], 100, 2), _fmt([r["nll"] for r in rs]),
            _fmt([r["ece"] for r in rs]), _fmt([r["brier"] for r in rs]), _fmt([r["aurc"] for r in rs]),
            _fmt(sh("3", "accuracy"), 100, 2), _fmt(sh("3", "ece")), _fmt(sh("5", "accuracy"), 100, 2), _fmt(sh("5", "ece")),
            _fmt_int([r["active_params"] for r in rs]), _fmt_int([r["guide_bytes"] for r in rs]),
            _fmt([r["seconds"] for r in rs], 1 / 60, 1), _fmt([r["epoch_seconds"] for r in rs], 1, 0),
            _fmt_int([r["train_flops_per_step"] for r in rs], sci=True),
        ])
    return rows


def plot(records, methods, args):
    """Accuracy and ECE against severity (0 = the clean test set), mean ± sd over seeds, one line per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in methods:
        rs = [r for r in records if r["key"] == key]
        if not rs:
            continue
        for ax, k in zip(axes, ("accuracy", "ece")):
            xs, ms, sds = [], [], []
            for sev in ("0",) + SEVERITIES:
                vals = [r[k] if sev == "0" else r["shift"].get(sev, {}).get(k) for r in rs]
                vals = [v for v in vals if v is not None]
                if vals:
                    m, sd = mean_std(vals)
                    xs.append(int(sev)), ms.append(m), sds.append(0.0 if len(vals) < 2 else sd)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=METHODS[key][0])
    for ax, name in zip(axes, ("test accuracy", "test ECE")):
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_ylabel(name)
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 (JPEG copy), ResNet-18 width {args.width}, {args.epochs} epochs", fontsize=10)
    save_figure(fig, args, "cifar_real")


def report(runs, args):
    records = [record(r) for r in runs if os.path.exists(r["out"])]
    missing = [r["tag"] for r in runs if not os.path.exists(r["out"])]
    md = "\n".join([
        "# The CIFAR example on the real CIFAR-10 images\n",
        f"`examples/cifar_resnet.py` on the CIFAR-10 images of `../shared/data/cifar10` (a JPEG copy at quality 75: "
        f"compare the methods side by side, not with published CIFAR-10 figures), ResNet-18 width {args.width}, "
        f"{args.epochs} epochs, the recipe's defaults (LRT, prior N(0, 0.005^2), KL weight 0.01 warmed up over the first "
        "half, cosine schedule over the run's epochs). Test metrics of the MC predictive (10 weight draws; the plain "
        "network for the deterministic one) on the 10,000 test images; shift = the ten CIFAR-10-C-style corruptions of "
        f"`examples/corruptions.py` on {args.shift_images} fixed test images, accuracy and ECE averaged over corruptions at "
        "severity 3 and 5; mean ± sd over seeds; FLOPs per training step counted as in the paper (3x the forward; a "
        "Bayesian layer's products scaled by its density, two of them under LRT; the kernels here still run dense "
        "convolutions, so these FLOPs are not the time).\n",
        markdown_table(HEADER, table_rows(records, args.methods)),
    ])
    if missing:
        md += "\n\nNot finished yet (continue with `--resume`): " + ", ".join(missing)
    if records:
        plot(records, args.methods, args)
    write_results("cifar_real", md, {"runs": records, "missing": missing}, args)
    print(md)
    return records


# command line -----------------------------------------------------------------------------
def check_data_dir(p, data_dir):
    """A one-line error (exit 2, through the parser ``p``) unless ``data_dir`` holds the unpacked image folder."""
    data = os.path.expanduser(data_dir)
    if not (os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "test"))):
        p.error(f"--data-dir {data_dir}: no train/ and test/ folders there; unpack ../shared/data/cifar10/cifar10-jpeg.tar.gz "
                "outside the repository (e.g. tar -xzf ... -C ~/.cache/cifar10-jpeg) and pass that folder")


def parse_args(argv):
    p = ArgumentParser(description="The CIFAR example on the real CIFAR-10 JPEG images: deterministic, dense VI, SSVI 0.1, SSVI 0.05.")
    p.add_argument("--data-dir", default="~/.cache/cifar10-jpeg", help="the unpacked image folder (train/<class>, test/<class>), outside the repository")
    p.add_argument("--width", type=int, default=8, help="ResNet-18 base width")
    p.add_argument("--epochs", type=int, default=5, help="training epochs of every run (but the fine-tuned ones)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of SSVI 0.1 fine-tuned from the deterministic run")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds of every method (default: 2 for dense VI and SSVI 0.1, 1 for the others)")
    p.add_argument("--shift-severities", default="3,5", help="the corruption severities scored (the table shows 3 and 5)")
    p.add_argument("--shift-images", type=int, default=2000, help="test images scored under each corruption and severity")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the example's --device")
    p.add_argument("--runs-dir", default=None, help=f"per-run JSON, checkpoints and logs (default {default_runs_dir()})")
    p.add_argument("--resume", action="store_true", help="continue the runs that have a checkpoint but no JSON yet")
    p.add_argument("--stop-after", type=int, default=None, help="end every run after N more epochs (the example's --stop-after); continue later with --resume")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, and run nothing")
    add_common_flags(p)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)}" if unknown else "--methods: name at least one method")
    for key, base in STARTS_FROM.items():
        if key in args.methods and base not in args.methods:
            p.error(f"--methods: {key} starts from the {base} run of its seed; list {base} too")
    for flag in ("width", "epochs", "finetune_epochs", "seeds", "stop_after", "workers", "shift_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {v}")
    args.runs_dir = os.path.abspath(os.path.expanduser(args.runs_dir or default_runs_dir()))
    if not args.dry_run:
        check_data_dir(p, args.data_dir)
        os.makedirs(args.runs_dir, exist_ok=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    states = {r["tag"]: status(r, args) for r in runs}
    blocked = [r["checkpoint"] for r in runs if states[r["tag"]] == "blocked"]
    todo = [r for r in runs if states[r["tag"]] in ("new", "resume", "blocked")]
    if args.dry_run:
        for r in runs:
            if states[r["tag"]] == "done":
                print(f"# {r['tag']}: done, reusing {r['out']}")
            else:
                note = " (blocked: checkpoint exists, pass --resume)" if states[r["tag"]] == "blocked" else ""
                print(shlex.join(command(r, args)) + note)
        return runs
    if blocked:
        raise UsageError(f"{len(blocked)} run(s) have a checkpoint but no result, e.g. {blocked[0]}: pass --resume to continue them, or delete the checkpoints")
    from tqdm.auto import tqdm

    failures = []
    # the runs that start from another run's checkpoint go after the others
    for phase in ([r for r in todo if "starts_from" not in r], [r for r in todo if "starts_from" in r]):
        if not phase:
            continue
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            failures += [f for f in tqdm(pool.map(lambda r: execute(r, args), phase), total=len(phase), desc="runs") if f]
    records = report(runs, args)
    if failures:
        raise BenchmarkError(f"{len(failures)} of {len(todo)} runs failed; first: {failures[0]}")
    return records


if __name__ == "__main__":
    run_main(main, usage_errors=(UsageError,), runtime_errors=(BenchmarkError,))
