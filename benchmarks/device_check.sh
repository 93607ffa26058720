#!/usr/bin/env bash
# The GPU check, as one prepared run: the CIFAR example's synthetic run at width 64, the cost
# benchmark and the sparse-kernel table on CUDA, and the test suite with tensors on CUDA by default.
#
#     bash benchmarks/device_check.sh OUTDIR        # from the repository root; pyro_ssvi importable
#
# Writes OUTDIR/run.log (versions, GPU, the example's and the benchmarks' output),
# OUTDIR/cifar_w64.json, OUTDIR/cost.{md,json,png}, OUTDIR/sparse_kernels.{md,json,png} and
# OUTDIR/suite.log. Each part has its own time limit (seconds: CIFAR_LIMIT, COST_LIMIT,
# KERNELS_LIMIT, SUITE_LIMIT) so one slow part cannot starve the rest.
set -u
out=${1:?usage: device_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/run.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name(0))"
} >"$log" 2>&1

echo "== cifar_resnet.py, synthetic, width 64" >>"$log"
start=$(date +%s)
timeout "${CIFAR_LIMIT:-100}" python3 examples/cifar_resnet.py --dataset synthetic --width 64 --epochs 2 \
    --num-synthetic 4096 --batch-size 128 --device cuda --out "$out/cifar_w64.json" >>"$log" 2>&1
echo "cifar rc=$? wall $(($(date +%s) - start)) s" >>"$log"

echo "== benchmarks/cost.py --device cuda" >>"$log"
start=$(date +%s)
timeout "${COST_LIMIT:-150}" python3 benchmarks/cost.py --device cuda --models resnet18,mlp3 --repeats 5 --results-dir "$out" >>"$log" 2>&1
echo "cost rc=$? wall $(($(date +%s) - start)) s" >>"$log"

echo "== benchmarks/sparse_kernels.py --device cuda (what sparse_kernels=\"auto\" picks on the GPU)" >>"$log"
start=$(date +%s)
timeout "${KERNELS_LIMIT:-60}" python3 benchmarks/sparse_kernels.py --device cuda --repeats 5 --blocks 3 --results-dir "$out" >>"$log" 2>&1
echo "sparse_kernels rc=$? wall $(($(date +%s) - start)) s" >>"$log"

echo "== pytest with PYRO_SSVI_TEST_DEVICE=cuda" >>"$log"
start=$(date +%s)
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14")
# -v streams one line per test, so a run cut short by its limit still says what failed
PYRO_SSVI_TEST_DEVICE=cuda timeout "${SUITE_LIMIT:-270}" python3 -m pytest -v --tb=short -p no:cacheprovider $workers \
    -p no:benchmark >"$out/suite.log" 2>&1
echo "suite rc=$? wall $(($(date +%s) - start)) s" >>"$log"
grep -cE " PASSED" "$out/suite.log" | sed 's/^/passed lines: /' >>"$log"
grep -E " (FAILED|ERROR) " "$out/suite.log" | sed 's/^\[gw[0-9]*\] *//' | sort | uniq | head -60 >>"$log"
tail -3 "$out/suite.log" >>"$log"
cat "$log"
