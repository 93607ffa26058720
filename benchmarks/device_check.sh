#!/usr/bin/env bash
# The GPU check, as prepared runs that each fit in one 10-minute device call.
#
#     bash benchmarks/device_check.sh OUTDIR          # from the repository root; pyro_ssvi importable
#     bash benchmarks/device_check.sh OUTDIR real     # the real-CIFAR-10 comparison alone
#     bash benchmarks/device_check.sh OUTDIR cost     # cost.py on CUDA alone (dense VI against SSVI)
#
# Default part ("all"): the CIFAR example's synthetic run at width 64, the step-cost protocol
# (bayes_cost.py: the deterministic ResNet-18 at width 64, batch 128, against SSVI 0.1 with weight
# sampling and LRT, AutoNormal and our guide at density 1, with a profile of an SSVI LRT step),
# the sparse-kernel table on CUDA, and the test suite with tensors on CUDA by default. Writes
# OUTDIR/run.log (versions, GPU, the example's and the benchmarks' output), OUTDIR/cifar_w64.json,
# OUTDIR/bayes_cost.{md,json,png}, OUTDIR/sparse_kernels.{md,json,png} and OUTDIR/suite.log. Each
# part has its own time limit (seconds) so one slow part cannot starve the rest:
#     CIFAR_LIMIT 80 + STEP_LIMIT 150 + KERNELS_LIMIT 60 + SUITE_LIMIT 270 = 560 s at most.
#
# "real": SSVI 0.1 and dense VI on the real CIFAR-10 images (the JPEG copy in
# ../shared/data/cifar10/cifar10-jpeg.tar.gz, unpacked into $TMPDIR, decode cache in $TMPDIR too),
# ResNet-18 width 64, batch 128, REAL_EPOCHS (default 4) epochs each: about 31 s per epoch of 391
# steps on an H200 (2.5 s per 32 steps in the synthetic run), so 4 epochs and the test evaluation
# (10 MC samples) take about 150 s per method; then each checkpoint is scored under two corruptions
# (gaussian_noise, contrast) at severities 1-5 with 4 MC samples (--eval-only --shift). Writes
# OUTDIR/real/{ssvi0.1,dense}.json (training and test metrics), OUTDIR/real/{ssvi0.1,dense}-shift.json,
# the checkpoints' logs, and a summary table in OUTDIR/run.log. Limits (seconds):
#     UNPACK_LIMIT 60 + 2 x REAL_TRAIN_LIMIT 170 + 2 x REAL_SHIFT_LIMIT 90 = 580 s at most.
set -u
out=${1:?usage: device_check.sh OUTDIR [all|real]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/run.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name(0))"
} >"$log" 2>&1

if [ "$part" = cost ]; then
    echo "== benchmarks/cost.py --device cuda" >>"$log"
    start=$(date +%s)
    timeout "${COST_LIMIT:-300}" python3 benchmarks/cost.py --device cuda --models resnet18,mlp3 --repeats 5 --results-dir "$out" >>"$log" 2>&1
    echo "cost rc=$? wall $(($(date +%s) - start)) s" >>"$log"
    cat "$log"
    exit 0
fi

if [ "$part" = real ]; then
    tmp=${TMPDIR:-/tmp}
    data="$tmp/cifar10-jpeg"
    echo "== unpacking the CIFAR-10 JPEG copy into $data" >>"$log"
    start=$(date +%s)
    mkdir -p "$data"
    [ -d "$data/train" ] || timeout "${UNPACK_LIMIT:-60}" tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C "$data" >>"$log" 2>&1
    # the archive may hold a top folder: use the one with train/ and test/
    [ -d "$data/train" ] || data=$(dirname "$(find "$data" -maxdepth 3 -type d -name train | head -1)")
    echo "unpack wall $(($(date +%s) - start)) s, data $data" >>"$log"
    export XDG_CACHE_HOME="$tmp/cache"
    mkdir -p "$out/real"
    for method in ssvi0.1 dense; do
        density=$([ "$method" = dense ] && echo 1.0 || echo 0.1)
        echo "== cifar_resnet.py --dataset folder, $method, width 64, ${REAL_EPOCHS:-4} epochs" >>"$log"
        start=$(date +%s)
        timeout "${REAL_TRAIN_LIMIT:-170}" python3 examples/cifar_resnet.py --dataset folder --data-dir "$data" --density "$density" \
            --width 64 --epochs "${REAL_EPOCHS:-4}" --batch-size 128 --mc-samples 10 --device cuda --no-progress \
            --checkpoint "$out/real/$method.pt" --overwrite --out "$out/real/$method.json" >>"$log" 2>&1
        echo "$method training rc=$? wall $(($(date +%s) - start)) s" >>"$log"
        start=$(date +%s)
        timeout "${REAL_SHIFT_LIMIT:-90}" python3 examples/cifar_resnet.py --dataset folder --data-dir "$data" --density "$density" \
            --width 64 --epochs "${REAL_EPOCHS:-4}" --batch-size 128 --mc-samples 4 --device cuda --no-progress \
            --checkpoint "$out/real/$method.pt" --eval-only --shift gaussian_noise,contrast --out "$out/real/$method-shift.json" >>"$log" 2>&1
        echo "$method shift rc=$? wall $(($(date +%s) - start)) s" >>"$log"
        rm -f "$out/real/$method.pt"  # 90+ MB each: keep the results, not the weights
    done
    python3 - "$out/real" >>"$log" 2>&1 <<'PY'
import json, os, sys
folder = sys.argv[1]
print("| method | epochs | train s | acc (MC) | NLL | ECE | active | shift acc s3 | shift ECE s3 | shift acc s5 | shift ECE s5 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for m in ("ssvi0.1", "dense"):
    try:
        r = json.load(open(os.path.join(folder, m + ".json")))
    except OSError:
        print(f"| {m} | not finished |"); continue
    try:
        s = json.load(open(os.path.join(folder, m + "-shift.json")))["shift"]["mc"]["mean"]
        sh = [f"{s[k]['accuracy']:.4f} | {s[k]['ece']:.4f}" for k in ("3", "5")]
    except (OSError, KeyError):
        sh = ["- | -", "- | -"]
    print(f"| {m} | {r['epochs']} | {r['seconds']:.0f} | {r['test_accuracy']['mc']:.4f} | {r['test_nll']['mc']:.4f} | "
          f"{r['test_ece']['mc']:.4f} | {r['active_params']}/{r['dense_params']} | {sh[0]} | {sh[1]} |")
PY
    cat "$log"
    exit 0
fi


echo "== cifar_resnet.py, synthetic, width 64" >>"$log"
start=$(date +%s)
timeout "${CIFAR_LIMIT:-80}" python3 examples/cifar_resnet.py --dataset synthetic --width 64 --epochs 2 \
    --num-synthetic 4096 --batch-size 128 --device cuda --out "$out/cifar_w64.json" >>"$log" 2>&1
echo "cifar rc=$? wall $(($(date +%s) - start)) s" >>"$log"

echo "== benchmarks/bayes_cost.py --device cuda (the step cost over the deterministic step, width 64, batch 128)" >>"$log"
start=$(date +%s)
timeout "${STEP_LIMIT:-150}" python3 benchmarks/bayes_cost.py --device cuda --models resnet18 --widths 64 \
    --configs ssvi0.1-w,ssvi0.1-lrt,dense-w,autonormal-w --repeats 9 --profile-steps 2 --results-dir "$out" >>"$log" 2>&1
echo "bayes_cost rc=$? wall $(($(date +%s) - start)) s" >>"$log"

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
