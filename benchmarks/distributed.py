"""Throughput of the CIFAR example with 1 and N processes (torchrun), side by side in one run.

    python benchmarks/distributed.py                      # CPU: 1 and 2 gloo processes, synthetic data (about 3 minutes)
    python benchmarks/distributed.py --device cuda --procs 1,2,4,8   # GPUs: one process per GPU, nccl

Each configuration trains ``examples/cifar_resnet.py`` on synthetic CIFAR-shaped data for
``--epochs`` epochs of the same global batch; images per second = training images x epochs /
training seconds (the example's JSON, rank 0's clock; set-up and evaluation excluded). The
configurations run in alternating order ``--repeats`` times; the table shows the median.
On the CPU every process gets ``cores / N`` threads, so 1 process uses the same cores as N.
Writes results/distributed.{md,json,png}.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_once(nproc, args, port):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        flags = ["--dataset", "synthetic", "--num-synthetic", str(args.images), "--width", str(args.width), "--epochs",
                 str(args.epochs), "--batch-size", str(args.batch_size), "--mc-samples", "0", "--bn-batches", "0",
                 "--no-progress", "--device", args.device, "--out", out]
        script = str(ROOT / "examples" / "cifar_resnet.py")
        env = dict(os.environ)
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, args.cores // nproc))
        if nproc == 1:
            cmd = [sys.executable, script, *flags]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", script, *flags]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"{nproc} processes failed:\n{res.stderr[-2000:]}")
        result = json.loads(pathlib.Path(out).read_text())
    return {"processes": nproc, "seconds": result["seconds"], "images_per_second": result["train_images"] * result["epochs"] / result["seconds"],
            "test_accuracy": result["test_accuracy"]["posterior_mean"]}


def main(argv=None):
    p = ArgumentParser(description="Images per second of the CIFAR example with 1 and N processes (torchrun).")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=1024, help="synthetic training images")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per configuration")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores shared by the processes")
    add_common_flags(p)
    args = p.parse_args(argv)
    try:
        args.procs = [int(n) for n in args.procs.split(",") if n]
    except ValueError:
        p.error(f"--procs: expected comma-separated integers, got {args.procs!r}")
    if not args.procs or min(args.procs) < 1 or min(args.images, args.width, args.epochs, args.batch_size, args.repeats, args.cores) < 1:
        p.error("--procs, --images, --width, --epochs, --batch-size, --repeats and --cores must be positive")
    from tqdm.auto import tqdm

    runs, port = [], 29700
    order = [(r, n) for r in range(args.repeats) for n in (args.procs if r % 2 == 0 else args.procs[::-1])]
    for r, n in tqdm(order, desc="runs"):
        port += 1
        runs.append({"repeat": r, **run_once(n, args, port)})
    rows, medians = [], {}
    for n in args.procs:
        ips = statistics.median(x["images_per_second"] for x in runs if x["processes"] == n)
        medians[n] = ips
        rows.append([n, f"{ips:.1f}", f"{ips / medians[args.procs[0]]:.2f}x"])
    md = "\n".join([
        "# Throughput of examples/cifar_resnet.py with several processes\n",
        f"Synthetic CIFAR-shaped data, {args.images} training images, ResNet-18 width {args.width}, SSVI density 0.1 with "
        f"LRT (the recipe), global batch {args.batch_size}, {args.epochs} epochs; device {args.device}"
        + (f", {args.cores} CPU cores split evenly between the processes (gloo)" if args.device == "cpu" else " (nccl, one GPU per process)")
        + f"; median of {args.repeats} alternating runs.\n",
        markdown_table(["processes", "images / s", f"x {args.procs[0]} process(es)"], rows),
    ])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([str(n) for n in args.procs], [medians[n] for n in args.procs])
    ax.set_xlabel("processes")
    ax.set_ylabel("training images / s")
    save_figure(fig, args, "distributed")
    write_results("distributed", md, runs, args)
    print(md)
    return runs


if __name__ == "__main__":
    run_main(main)
