"""Dense against sparse kernels for one sparse linear layer, forward + backward (groundwork for issue 10).

    python benchmarks/sparse_kernels.py          # widths 256-4096, densities 0.02-0.5, batch 128 (a few minutes)

A layer ``y = x W^T`` whose weight has ``k = density * out * in`` active entries (values ``v``
at flat positions ``index``), as SSVI trains it: gradients are needed for ``x`` and ``v``.

* dense: scatter ``v`` into a zero ``(out, in)`` weight, ``F.linear``; backward through the
  scatter (what SSVI does today);
* sparse: ``W`` as CSR (PyTorch's sparse kernels): forward ``W x^T``; input gradient through
  a cached CSR of ``W^T``; value gradient by ``torch.sparse.sampled_addmm`` (``(g^T x)``
  sampled at the active positions). No dense weight or dense weight gradient is formed.

Times are medians of ``--repeats`` forward+backward passes, both kernels timed in alternation
in this run; the crossover is the largest measured density at which the sparse kernel is
faster. Writes results/sparse_kernels.{md,json,png}.
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, pyplot, save_figure, write_results  # noqa: E402


def make_layer(width, density, batch, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    numel = width * width
    k = max(1, round(density * numel))
    index = torch.randperm(numel, generator=g)[:k].sort().values.to(device)
    values = torch.randn(k, generator=g).to(device)
    x = torch.randn(batch, width, generator=g).to(device)
    return index, values, x


class SparseLinear:
    """CSR structures of ``W`` and ``W^T`` for one active set, built once (at each subspace update)."""

    def __init__(self, index, shape):
        import torch

        rows, cols = index // shape[1], index % shape[1]
        self.shape = shape
        ones = torch.ones(index.numel(), dtype=torch.float32, device=index.device)
        self.pattern = torch.sparse_coo_tensor(torch.stack([rows, cols]), ones, shape).coalesce().to_sparse_csr()
        # W^T's CSR lists the same entries in column-major order: remember the permutation
        order = torch.argsort(cols * shape[0] + rows)
        self.t_crow = torch._convert_indices_from_coo_to_csr(cols[order], shape[1])
        self.t_col = rows[order]
        self.t_order = order

    def csr(self, values):
        import torch

        return torch.sparse_csr_tensor(self.pattern.crow_indices(), self.pattern.col_indices(), values, self.shape)

    def csr_t(self, values):
        import torch

        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_order], (self.shape[1], self.shape[0]))


def sparse_step(layer, values, x, grad_out):
    """Forward and both gradients with sparse kernels; returns (y, grad_x, grad_values)."""
    import torch

    y = (layer.csr(values) @ x.t()).t()
    grad_x = (layer.csr_t(values) @ grad_out.t()).t()
    grad_v = torch.sparse.sampled_addmm(layer.pattern, grad_out.t().contiguous(), x, beta=0.0).values()
    return y, grad_x, grad_v


def dense_step(index, values, x, shape):
    import torch
    import torch.nn.functional as F

    v = values.detach().requires_grad_()
    xx = x.detach().requires_grad_()
    w = torch.zeros(shape[0] * shape[1], dtype=v.dtype, device=v.device).scatter(0, index, v).reshape(shape)
    y = F.linear(xx, w)
    y.backward(torch.ones_like(y))
    return y, xx.grad, v.grad


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(args):
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        for density in args.densities:
            index, values, x = make_layer(width, density, args.batch, "cpu")
            layer = SparseLinear(index, (width, width))
            grad_out = torch.ones(args.batch, width)
            # exactness first: both paths give the same output and gradients
            y_d, gx_d, gv_d = dense_step(index, values, x, (width, width))
            y_s, gx_s, gv_s = sparse_step(layer, values, x, grad_out)
            err = max(float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12))) for a, b in ((y_s, y_d), (gx_s, gx_d), (gv_s, gv_d)))
            for _ in range(2):  # warm up both
                dense_step(index, values, x, (width, width))
                sparse_step(layer, values, x, grad_out)
            dense_t, sparse_t = [], []
            for _ in range(args.blocks):
                dense_t.append(timed(lambda: dense_step(index, values, x, (width, width)), args.repeats))
                sparse_t.append(timed(lambda: sparse_step(layer, values, x, grad_out), args.repeats))
            t0 = time.perf_counter()
            SparseLinear(index, (width, width))
            build = time.perf_counter() - t0
            rows.append({"width": width, "density": density, "dense_seconds": statistics.median(dense_t),
                         "sparse_seconds": statistics.median(sparse_t), "build_seconds": build, "max_relative_error": err})
            r = rows[-1]
            print(f"width {width} density {density}: dense {r['dense_seconds'] * 1e3:.2f} ms, sparse {r['sparse_seconds'] * 1e3:.2f} ms "
                  f"({r['sparse_seconds'] / r['dense_seconds']:.2f}x), build {build * 1e3:.1f} ms, rel. error {err:.1e}", flush=True)
    return rows


def main(argv=None):
    p = ArgumentParser(description="Dense vs CSR kernels for a sparse linear layer, forward + backward.")
    p.add_argument("--widths", default="256,1024,4096", help="comma-separated square layer widths")
    p.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.5", help="comma-separated densities")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per block")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per kernel")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    add_common_flags(p)
    args = p.parse_args(argv)
    try:
        args.widths = [int(w) for w in args.widths.split(",") if w]
        args.densities = [float(d) for d in args.densities.split(",") if d]
    except ValueError:
        p.error("--widths / --densities: expected comma-separated numbers")
    if not args.widths or min(args.widths) < 1 or not args.densities or not all(0 < d <= 1 for d in args.densities):
        p.error("--widths: positive integers; --densities: values in (0, 1]")
    if min(args.batch, args.repeats, args.blocks, args.threads) < 1:
        p.error("--batch, --repeats, --blocks and --threads must be positive")
    rows = measure(args)
    table, crossover = [], {}
    for r in rows:
        table.append([r["width"], r["density"], f"{r['dense_seconds'] * 1e3:.2f}", f"{r['sparse_seconds'] * 1e3:.2f}",
                      f"{r['sparse_seconds'] / r['dense_seconds']:.2f}x", f"{r['build_seconds'] * 1e3:.1f}", f"{r['max_relative_error']:.1e}"])
        if r["sparse_seconds"] < r["dense_seconds"]:
            crossover[r["width"]] = max(crossover.get(r["width"], 0.0), r["density"])
    lines = [f"width {w}: sparse faster up to density {crossover[w]}" if w in crossover else f"width {w}: dense faster at every density measured"
             for w in args.widths]
    md = "\n".join([
        "# Sparse linear layer: dense scatter + F.linear against CSR kernels\n",
        f"Forward + backward (input and value gradients) of one square layer, batch {args.batch}, {args.threads} torch thread(s), CPU; "
        f"median over {args.blocks} alternating blocks of {args.repeats} passes. Build: time to make the CSR structures "
        "(once per subspace update). Error: largest relative difference of output and gradients between the paths.\n",
        markdown_table(["width", "density", "dense ms", "sparse ms", "sparse / dense", "build ms", "rel. error"], table),
        "",
        "Crossover (largest measured density where the sparse kernel wins): " + "; ".join(lines) + ".",
    ])
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
    write_results("sparse_kernels", md, rows, args)
    print(md)
    return rows


if __name__ == "__main__":
    run_main(main)
