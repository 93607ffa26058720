"""What the finite-gradient guard costs: SSVI checks every gradient before each optimiser step.

    python benchmarks/guard_cost.py                      # the MLP and ResNet-18 steps of cost.py
    python benchmarks/guard_cost.py --models mlp3 --repeats 21

Before the optimiser may use a step's gradients, ``SSVI`` reduces all of them to their largest
magnitude in one fused reduction (``pyro_ssvi.finite.gradient_max_abs``) and reads it back with the
loss in one transfer. This script builds the networks of ``cost.py`` (SSVI at density 0.1, weight
sampling, Adam, ``TraceMeanField_ELBO``), and in alternating rounds times a whole SSVI step and the
check alone on that step's gradient tensors. Target: the check under 2% of a step. Writes
results/guard_cost.{md,json}.
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import markdown_table, write_results  # noqa: E402
from cost import MODELS, build  # noqa: E402
from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402


def measure(model_name, device, repeats, width):
    import pyro
    import torch

    from pyro_ssvi import SSVI, SparseSubspaceGuide
    from pyro_ssvi.finite import gradient_max_abs

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, x, y = build(model_name, device, width=width)
    guide = SparseSubspaceGuide(model, density=0.1, dense_sites=model.dense_sites)
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.TraceMeanField_ELBO(), total_steps=10**9, update_every=10**8)
    for _ in range(2):
        svi.step(x, y)
    grads = [p.grad for _, p in pyro.get_param_store().named_parameters() if p.grad is not None]  # zeroed, full size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def check():
        loss = torch.tensor([1.0], device=device)
        torch.stack([gradient_max_abs(grads).to(loss).reshape(()), loss.reshape(())]).tolist()

    steps, checks = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        svi.step(x, y)
        sync()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(10):
            check()
        sync()
        checks.append((time.perf_counter() - t0) / 10)
    step, guard = statistics.median(steps), statistics.median(checks)
    return {"model": model_name, "device": str(device), "gradient_tensors": len(grads),
            "gradient_entries": sum(g.numel() for g in grads), "step_s": step, "check_s": guard, "fraction": guard / step}


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp3,resnet18", help=f"comma-separated among {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=11, help="rounds of (one step, the check alone)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: cost.py's network)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--results-dir", default=None, help="where to write guard_cost.{md,json}")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or args.repeats < 1:
        p.error(f"--models: unknown {unknown}" if unknown else "--repeats: expected a positive integer")
    import torch

    torch.set_num_threads(2)
    rows, runs = [], []
    for name in models:
        r = measure(name, torch.device(args.device), args.repeats, args.width)
        runs.append(r)
        rows.append([MODELS[name], r["gradient_tensors"], f"{r['gradient_entries']:,}", f"{1e3 * r['step_s']:.1f}",
                     f"{1e3 * r['check_s']:.3f}", f"{100 * r['fraction']:.2f}%"])
    table = markdown_table(["network", "gradient tensors", "gradient entries", "step ms", "check ms", "check / step"], rows)
    print(table)
    text = f"# Cost of the finite-gradient guard\n\n`python benchmarks/guard_cost.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n"
    write_results("guard_cost", text, runs, args)
    return runs


if __name__ == "__main__":
    run_main(main)
