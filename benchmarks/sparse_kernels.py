"""Dense against sparse kernels for one sparse layer, forward + backward (``pyro_ssvi.kernels``).

    python benchmarks/sparse_kernels.py          # widths 256-4096, densities 0.02-0.5, batch 128, and convolutions (a few minutes)

A layer ``y = x W^T`` whose weight has ``k = density * out * in`` active entries (values ``v``
at flat positions ``index``), as SSVI trains it: gradients are needed for ``x`` and ``v``.

* dense: scatter ``v`` into a zero ``(out, in)`` weight, ``F.linear``; backward through the
  scatter (SSVI with ``sparse_kernels=False``);
* sparse: ``pyro_ssvi.kernels.sparse_linear`` (forward ``W x^T`` and the input gradient through
  the cached CSR structure of ``W^T`` as ``F.embedding_bag`` weighted row sums, value gradient by
  ``torch.sparse.sampled_addmm``), with the values in the row-major order SSVI keeps them in. No
  dense weight or dense weight gradient is formed.

Times are medians of ``--repeats`` forward+backward passes, both kernels timed in alternation
in this run; the crossover is the largest measured density at which the sparse kernel is
faster. "auto" is what ``SparseSubspaceGuide(sparse_kernels="auto")`` would pick for the layer
(``pyro_ssvi.kernels.measure``, its own short measurement). Convolutions: 3x3 layers of a CIFAR
ResNet-18 at density ``--conv-density``, dense ``F.conv2d`` (oneDNN) against the two sparse paths of
``pyro_ssvi.kernels.sparse_conv2d``: im2col (``F.unfold`` + the same sparse kernel) and, with numba installed, the
direct kernels of ``pyro_ssvi.direct_conv``; the limit line is ``density x`` the dense time. ``--conv-densities``
adds, for the first layer of each width, the time against density. Writes results/sparse_kernels.{md,json,png}.
"""

import contextlib
import os

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402

#: CIFAR ResNet-18 3x3 convolutions (channels, spatial size) at base width 64, batch 32
CONVS = [(64, 32), (128, 16), (256, 8), (512, 4)]


def make_layer(numel, density, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    k = max(1, round(density * numel))
    index = torch.randperm(numel, generator=g)[:k].sort().values  # storage in row-major order, as SSVI keeps it
    return index.to(device), torch.randn(k, generator=g).to(device)


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def dense_linear_step(pattern, values, x):
    import torch.nn.functional as F

    v, xx = values.detach().requires_grad_(), x.detach().requires_grad_()
    y = F.linear(xx, pattern.dense(v))
    y.backward(_ones(y))
    return y, xx.grad, v.grad


def sparse_linear_step(pattern, values, x):
    from pyro_ssvi.kernels import sparse_linear

    v, xx = values.detach().requires_grad_(), x.detach().requires_grad_()
    y = sparse_linear(xx, v, pattern)
    y.backward(_ones(y))
    return y, xx.grad, v.grad


def _ones(y):
    import torch

    return torch.ones_like(y)


def dense_conv_step(pattern, values, x):
    import torch.nn.functional as F

    v, xx = values.detach().requires_grad_(), x.detach().requires_grad_()
    y = F.conv2d(xx, pattern.dense(v), padding=1)
    y.backward(_ones(y))
    return y, xx.grad, v.grad


@contextlib.contextmanager
def conv_path(path):
    """``sparse_conv2d`` on the ``"im2col"`` or the ``"direct"`` path (``PYRO_SSVI_DIRECT_CONV``) inside the block."""
    old = os.environ.get("PYRO_SSVI_DIRECT_CONV")
    os.environ["PYRO_SSVI_DIRECT_CONV"] = "1" if path == "direct" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYRO_SSVI_DIRECT_CONV"]
        else:
            os.environ["PYRO_SSVI_DIRECT_CONV"] = old


def sparse_conv_step(pattern, values, x, path="im2col"):
    """``pyro_ssvi.kernels.sparse_conv2d`` on ``path``: im2col (``F.unfold``) and the CSR kernel, or the direct kernels."""
    from pyro_ssvi.kernels import sparse_conv2d

    v, xx = values.detach().requires_grad_(), x.detach().requires_grad_()
    with conv_path(path):
        y = sparse_conv2d(xx, v, pattern, padding=1)
        y.backward(_ones(y))
    return y, xx.grad, v.grad


def compare(dense, sparse, repeats, blocks, device):
    """Relative error between the two paths, then their median times (alternating blocks)."""
    out_d, out_s = dense(), sparse()
    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(out_s, out_d))
    for _ in range(2):  # warm up both
        dense(), sparse()
    dense_t, sparse_t = [], []
    for _ in range(blocks):
        dense_t.append(timed(dense, repeats, device))
        sparse_t.append(timed(sparse, repeats, device))
    return err, statistics.median(dense_t), statistics.median(sparse_t)


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_linear(args):
    import torch

    from pyro_ssvi.kernels import LinearPattern, measure

    rows = []
    for width in args.widths:
        for density in args.densities:
            index, values = make_layer(width * width, density, args.device)
            x = torch.randn(args.batch, width, generator=torch.Generator().manual_seed(1)).to(args.device)
            t0 = time.perf_counter()
            pattern = LinearPattern(index, (width, width))
            build = time.perf_counter() - t0
            err, dense_s, sparse_s = compare(lambda: dense_linear_step(pattern, values, x),
                                             lambda: sparse_linear_step(pattern, values, x), args.repeats, args.blocks, args.device)
            auto = measure(pattern, x.detach().requires_grad_(), values.detach().requires_grad_())["sparse"]
            rows.append({"width": width, "density": density, "dense_seconds": dense_s, "sparse_seconds": sparse_s,
                         "build_seconds": build, "max_relative_error": err, "auto_picks_sparse": auto})
            print(f"width {width} density {density}: dense {dense_s * 1e3:.2f} ms, sparse {sparse_s * 1e3:.2f} ms "
                  f"({sparse_s / dense_s:.2f}x), build {build * 1e3:.1f} ms, rel. error {err:.1e}, auto: {'sparse' if auto else 'dense'}", flush=True)
    return rows


def conv_paths(device):
    """The sparse convolution paths this machine has: im2col always, direct with numba on the CPU."""
    from pyro_ssvi import direct_conv

    return ["im2col"] + (["direct"] if device == "cpu" and direct_conv.numba is not None else [])


def measure_conv_layer(args, channels, size, density):
    """One 3x3 layer: dense and every sparse path, timed in alternation; a row of the conv table."""
    import torch

    from pyro_ssvi.kernels import ConvCall, LinearPattern, measure_conv2d

    index, values = make_layer(channels * channels * 9, density, args.device)
    x = torch.randn(args.conv_batch, channels, size, size, generator=torch.Generator().manual_seed(1)).to(args.device)
    pattern = LinearPattern(index, (channels, channels, 3, 3))  # the weight as its (C_out, C_in * 3 * 3) im2col matrix
    row = {"channels": channels, "size": size, "density": density}
    for path in conv_paths(args.device):
        err, dense_s, sparse_s = compare(lambda: dense_conv_step(pattern, values, x),
                                         lambda: sparse_conv_step(pattern, values, x, path), args.repeats, args.blocks, args.device)
        row.setdefault("dense_seconds", []).append(dense_s)  # one dense time per comparison, medianed below
        row[f"{path}_seconds"], row[f"{path}_relative_error"] = sparse_s, err
    row["dense_seconds"] = statistics.median(row["dense_seconds"])
    xg = x.detach().requires_grad_()
    row["auto_picks_sparse"] = measure_conv2d(pattern, xg, values.detach().requires_grad_(), ConvCall.of(xg, 1, 1, 1))["sparse"]
    row["limit_seconds"] = density * row["dense_seconds"]
    times = ", ".join(f"{p} {row[f'{p}_seconds'] * 1e3:.2f} ms ({row[f'{p}_seconds'] / row['dense_seconds']:.2f}x)" for p in conv_paths(args.device))
    print(f"conv {channels}x{channels}x3x3 at {size}x{size}, density {density}: dense {row['dense_seconds'] * 1e3:.2f} ms, {times}, "
          f"auto: {'sparse' if row['auto_picks_sparse'] else 'dense'}", flush=True)
    return row


def measure_conv(args):
    rows = [measure_conv_layer(args, channels, size, args.conv_density) for channels, size in CONVS]
    sweep = [measure_conv_layer(args, channels, size, d) for channels, size in CONVS[:: max(1, len(CONVS) // 2)]
             for d in args.conv_densities]
    return rows, sweep


def main(argv=None):
    p = ArgumentParser(description="Dense vs sparse kernels for a sparse layer, forward + backward.")
    p.add_argument("--widths", default="256,1024,4096", help="comma-separated square layer widths")
    p.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.5", help="comma-separated densities")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--conv-density", type=float, default=0.1, help="density of the convolutions measured")
    p.add_argument("--conv-batch", type=int, default=32, help="batch of the convolutions (0: skip them)")
    p.add_argument("--conv-densities", default="", help="comma-separated densities of the time-against-density sweep of two layers (empty: none)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per block")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per kernel")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_common_flags(p)
    args = p.parse_args(argv)
    try:
        args.widths = [int(w) for w in args.widths.split(",") if w]
        args.densities = [float(d) for d in args.densities.split(",") if d]
        args.conv_densities = [float(d) for d in args.conv_densities.split(",") if d]
    except ValueError:
        p.error("--widths / --densities / --conv-densities: expected comma-separated numbers")
    if not all(0 < d <= 1 for d in args.conv_densities):
        p.error("--conv-densities: values in (0, 1]")
    if not args.widths or min(args.widths) < 1 or not args.densities or not all(0 < d <= 1 for d in args.densities):
        p.error("--widths: positive integers; --densities: values in (0, 1]")
    if not 0 < args.conv_density <= 1:
        p.error("--conv-density: expected a value in (0, 1]")
    if min(args.batch, args.repeats, args.blocks, args.threads) < 1 or args.conv_batch < 0:
        p.error("--batch, --repeats, --blocks and --threads must be positive, --conv-batch >= 0")
    import torch

    torch.set_num_threads(args.threads)
    rows = measure_linear(args)
    convs, sweep = measure_conv(args) if args.conv_batch else ([], [])
    table, crossover = [], {}
    for r in rows:
        table.append([r["width"], r["density"], f"{r['dense_seconds'] * 1e3:.2f}", f"{r['sparse_seconds'] * 1e3:.2f}",
                      f"{r['sparse_seconds'] / r['dense_seconds']:.2f}x", "sparse" if r["auto_picks_sparse"] else "dense",
                      f"{r['build_seconds'] * 1e3:.1f}", f"{r['max_relative_error']:.1e}"])
        if r["sparse_seconds"] < r["dense_seconds"]:
            crossover[r["width"]] = max(crossover.get(r["width"], 0.0), r["density"])
    lines = [f"width {w}: sparse faster up to density {crossover[w]}" if w in crossover else f"width {w}: dense faster at every density measured"
             for w in args.widths]
    md = [
        "# Sparse layers: dense scatter + F.linear / F.conv2d against the sparse kernels of pyro_ssvi.kernels (embedding-bag row sums and sampled_addmm over the CSR structure)\n",
        f"Forward + backward (input and value gradients) of one square linear layer, batch {args.batch}, "
        + (f"{args.threads} torch thread(s), CPU" if args.device == "cpu" else "on CUDA")
        + f"; median over {args.blocks} alternating blocks of {args.repeats} passes. auto: the kernel "
        "`SparseSubspaceGuide(sparse_kernels=\"auto\")` picks for this call shape (its own short measurement, sparse only "
        "below 0.9x the dense time). Build: time to make the CSR structures (once per subspace update). Error: largest "
        "relative difference of output and gradients between the paths.\n",
        markdown_table(["width", "density", "dense ms", "sparse ms", "sparse / dense", "auto", "build ms", "rel. error"], table),
        "",
        "Crossover (largest measured density where the sparse kernel wins): " + "; ".join(lines) + ".",
    ]
    if convs:
        paths = conv_paths(args.device)

        def conv_table(rs):
            return markdown_table(
                ["channels", "input size", "density", "dense ms", *(f"{p} ms" for p in paths), *(f"{p} / dense" for p in paths),
                 "limit (density x dense) ms", "rel. error", "auto"],
                [[c["channels"], f"{c['size']}x{c['size']}", c["density"], f"{c['dense_seconds'] * 1e3:.2f}",
                  *(f"{c[f'{p}_seconds'] * 1e3:.2f}" for p in paths), *(f"{c[f'{p}_seconds'] / c['dense_seconds']:.2f}x" for p in paths),
                  f"{c['limit_seconds'] * 1e3:.2f}", f"{max(c[f'{p}_relative_error'] for p in paths):.1e}",
                  "sparse" if c["auto_picks_sparse"] else "dense"] for c in rs])

        md += [
            f"\n## Convolutions (3x3, padding 1, batch {args.conv_batch}, density {args.conv_density})\n",
            "The 3x3 layers of a CIFAR ResNet-18 (base width 64): dense `F.conv2d` (oneDNN) on the scattered weight against "
            "`pyro_ssvi.kernels.sparse_conv2d` on each path (im2col: `F.unfold`, then the same sparse kernel; direct: the numba "
            "kernels of `pyro_ssvi.direct_conv`), forward + backward; limit: the density times the dense time; \"auto\" is "
            "what `sparse_kernels=\"auto\"` picks for the layer (`kernels.measure_conv2d`, on the path this run has).\n",
            conv_table(convs),
        ]
        if sweep:
            md += ["\n### Time against density\n", conv_table(sweep)]
    md = "\n".join(md)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for w in args.widths:
        rs = [r for r in rows if r["width"] == w]
        ax.plot([r["density"] for r in rs], [r["sparse_seconds"] / r["dense_seconds"] for r in rs], marker="o", label=f"width {w}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("sparse / dense time")
    ax.legend()
    save_figure(fig, args, "sparse_kernels")
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for channels in dict.fromkeys(r["channels"] for r in sweep):
            rs = [r for r in sweep if r["channels"] == channels]
            for path in conv_paths(args.device):
                ax.plot([r["density"] for r in rs], [r[f"{path}_seconds"] * 1e3 for r in rs], marker="o", label=f"{channels} ch, {path}")
            ax.plot([r["density"] for r in rs], [r["dense_seconds"] * 1e3 for r in rs], ls="--", label=f"{channels} ch, dense")
            ax.plot([r["density"] for r in rs], [r["limit_seconds"] * 1e3 for r in rs], ls=":", label=f"{channels} ch, limit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density")
        ax.set_ylabel("ms, forward + backward")
        ax.legend(fontsize=6)
        save_figure(fig, args, "sparse_kernels_conv_density")
    write_results("sparse_kernels", md, {"linear": rows, "conv": convs, "conv_density_sweep": sweep}, args)
    print(md)
    return rows, convs


if __name__ == "__main__":
    run_main(main)
