#!/usr/bin/env bash
# The GPU checks, as one prepared script for a session that is lent a GPU machine (its time is short: run this,
# not a sequence of hand-typed commands). From the repository root on that machine:
#
#   bash scripts/device_check.sh CIFAR_DIR OUT_DIR
#
# CIFAR_DIR holds CIFAR-10 (cifar-10-batches-py/ or its .tar.gz/.tar.xz); OUT_DIR receives gpu.csv, log.txt,
# bench.csv, bench.md, bench_accuracy.csv, bench_tract.csv and step_profile.txt. Steps, each logged and timed:
#   1. the GPU's name, driver and memory (every figure must name its GPU)
#   2. pytest -m cuda: TrAct under CUDA bf16/fp16 autocast in channels_last against the dense reference, and
#      one tract-train epoch per precision on CUDA
#   3. scripts/bench_tract.py: TrAct's per-step cost in bf16 and fp16 for the CIFAR models and ImageNet ResNet-50
#   4. scripts/step_profile.py: a bf16 ResNet-18 step's FLOPs and time against the GPU's bf16 rate on a large
#      matrix product and 3x3 convolution, and its top kernels (OUT_DIR/step_profile.txt): how far the step is
#      from the hardware's ceiling
#   5. scripts/bench_train.py: throughput targets (>= 3x the reference loop, <= 1.5 s per CIFAR-10 epoch,
#      TrAct overhead <= 3 %), written before fast-vs-reference accuracy (ACCURACY="flags": default 4 epochs x
#      2 seeds of ResNet-18; ACCURACY="" skips it)
#   6. tract-train ResNet-18 in bf16 and in fp32, same seeds (PRECISION="overrides": default 4 epochs x seeds
#      0,1; PRECISION="" skips it): whether bf16 autocast, the CUDA default, costs accuracy against fp32 (on a
#      2-core CPU it trailed fp32 in most paired runs; results/README.md). Run folders (with checkpoints) go to
#      RUNS_DIR (default /tmp/precision_runs), the tract-report tables to OUT_DIR/precision/{bf16,fp32}/
# The short steps come first and the long accuracy runs last, so a run stopped at its time limit keeps the most.
# Python packages the machine lacks (hydra-core, omegaconf, antlr4-python3-runtime) must be importable, e.g.
# installed from carried wheels into a folder on PYTHONPATH. Extra flags: TRACT_ARGS="..." (step 3),
# PROFILE_ARGS="..." (step 4), BENCH_ARGS="..." (step 5).
# BUNDLE=FILE.tgz (outside OUT_DIR) packs OUT_DIR into one archive after every step, replacing the last one whole:
# the device tool brings back at most 8 files from $OUT, and a run cut off at its time limit still returns the steps
# it finished (BUNDLE=$OUT/device_check.tgz, OUT_DIR elsewhere). scripts/device_prepare.sh prints such a call.
# tests/test_bench.py runs it all on a CPU with tiny settings (every step but nvidia-smi must pass), so that it is
# known to work before a GPU's scarce time is spent on it.
set -uo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/device_check.sh CIFAR_DIR OUT_DIR" >&2
    exit 2
fi
data=$1
out=$2
case "$(realpath -m "${BUNDLE:-/}")" in
    "$(realpath -m "$out")"/*)
        echo "BUNDLE=$BUNDLE lies inside OUT_DIR $out: put it outside, e.g. \$OUT/device_check.tgz" >&2
        exit 2 ;;
esac
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRACT_DATA="$data"
ACCURACY=${ACCURACY---accuracy-epochs 4 --accuracy-seeds 2 --accuracy-models resnet18_cifar}
PRECISION=${PRECISION-epochs=4 seed=0,1}
RUNS_DIR=${RUNS_DIR-/tmp/precision_runs}
status=0

step() {  # step NAME COMMAND...: run, log to OUT_DIR/log.txt, remember a failure, go on with the next step
    local name=$1 t0=$SECONDS rc
    shift
    echo "== $name: $*" | tee -a "$out/log.txt"
    "$@" 2>&1 | tee -a "$out/log.txt"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/log.txt"
    [ "$rc" -eq 0 ] || status=1
    # written aside, then renamed: a run killed while packing still leaves the previous archive whole
    [ -z "${BUNDLE:-}" ] || { tar -czf "$BUNDLE.part" -C "$out" . && mv "$BUNDLE.part" "$BUNDLE"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>/dev/null
step gpu nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step cuda-tests python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_precisions.py
# shellcheck disable=SC2086  # TRACT_ARGS is a list of flags
step bench-tract python3 scripts/bench_tract.py --out "$out/bench_tract.csv" ${TRACT_ARGS:-}
# shellcheck disable=SC2086  # PROFILE_ARGS, ACCURACY and BENCH_ARGS are lists of flags
step step-profile python3 scripts/step_profile.py --out "$out/step_profile.txt" ${PROFILE_ARGS:-}
step bench python3 scripts/bench_train.py --out-dir "$out" $ACCURACY ${BENCH_ARGS:-}
if [ -n "$PRECISION" ]; then
    for p in bf16 fp32; do
        # shellcheck disable=SC2086  # PRECISION is a list of overrides
        step "precision-$p" python3 -m tract_bench.cli -m dataset=cifar10 model=resnet18 precision=$p $PRECISION \
            out_dir="$RUNS_DIR/$p" progress=false
        step "report-$p" python3 -m tract_bench.report "$RUNS_DIR/$p" --out "$out/precision/$p"
    done
fi
exit $status
