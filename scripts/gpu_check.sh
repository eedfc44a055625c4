#!/usr/bin/env bash
# One command for a GPU machine lent for a few minutes: install what its image lacks, check that JAX sees the
# accelerator, then measure what an accelerator user asks, each step under its own time limit (a failure or a
# time-out leaves the rest), and write one markdown report. docs/gpu.md explains every figure.
#
#   bash scripts/gpu_check.sh --wheels .whl --out gpu_report.md    # a GPU machine (e.g. one H100 / H200)
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_report.md   # the same steps at tiny sizes on the CPU (tests)
#
# Options:
#   --wheels DIR   install DIR/*.whl (scripts/gpu_wheels.txt names them and how to download them) into a fresh
#                  --target directory put on PYTHONPATH; without it the image must already have them
#   --out FILE     the report (default gpu_report.md); each step's log and JSON lie beside it in FILE.d/
#   --budget S     seconds for all the steps together (default 500; a step never runs past what is left, and the
#                  steps that find the budget spent are reported as skipped)
#   --dry-run      tiny sizes, JAX on the CPU, one quick test file: what the test suite runs
#   --only STEPS   run only these steps (comma-separated names from the report's step column, e.g.
#                  imports,device,bench_a,tests_test_hf_parity); the others are reported as not selected
#   --python PY    the interpreter (default python3)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=gpu_report.md WHEELS="" BUDGET=500 DRY=0 ONLY="" PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --python) PY=$2; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$OUT" in /*) ;; *) OUT=$ROOT/$OUT ;; esac
WORK=$OUT.d
rm -rf "$WORK" && mkdir -p "$WORK" || { echo "gpu_check: cannot write $WORK" >&2; exit 2; }
START=$(date +%s)
STEPS=$WORK/steps.tsv
: > "$STEPS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # each step's process takes what it needs; its peak is read per process

if [ "$DRY" = 1 ]; then
  SIZE=tiny
  # one CPU device, as one GPU (the caller's other XLA flags, e.g. the test suite's, are kept)
  export JAX_PLATFORMS=cpu XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g') --xla_force_host_platform_device_count=1"
  TESTS="tests/test_numerics.py"  # a quick file: the step's plumbing, not the accelerator tests
else
  SIZE=full
  # The test files that matter on an accelerator: model parity, attention kernels, scorer, train step.
  TESTS="tests/test_hf_parity.py tests/test_attention_impl.py tests/test_scorer.py tests/test_train_core.py"
fi

# step NAME LIMIT CMD...: runs CMD with its log in $WORK/NAME.log under min(LIMIT, budget left) seconds and
# records "NAME<TAB>status<TAB>seconds" (ok, failed (exit N), timed out after N s, skipped: budget spent).
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    printf '%s\tnot selected (--only)\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped: budget spent\t0\n' "$name" >> "$STEPS"
    echo "gpu_check: $name skipped (budget of ${BUDGET} s spent)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (limit ${limit} s)"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$STEPS"
  echo "gpu_check: $name: $status in ${secs} s"
  [ $rc = 0 ]
}

# 1. What the image lacks, from wheels (no network on such a machine).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$WHEELS" ]; then
  SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH=$SITE:$PYTHONPATH
fi

# 2. Every module the steps import, with versions; then the device.
step imports 90 "$PY" - <<'EOF'
import importlib, importlib.metadata as md
mods = ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "array_record", "tensorboardX", "gguf",
        "transformers", "tokenizers", "sentencepiece", "safetensors", "torch", "peft", "yaml", "pandas", "etils",
        "labor_jax.training.loop", "labor_jax.scorer", "labor_jax.planning", "labor_jax.interop.hf",
        "data_pipeline.tokenizer", "data_pipeline.loader"]
for m in mods:
  importlib.import_module(m)
dists = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "tensorboardX", "gguf",
         "transformers", "torch", "peft"]
print("versions: " + ", ".join(f"{d} {md.version(d)}" for d in dists))
EOF
step device 90 "$PY" - <<EOF
import jax
d = jax.devices()
print(f"devices: {len(d)} x {d[0].device_kind} (backend {jax.default_backend()}, jax {jax.__version__})")
if $([ "$DRY" = 1 ] && echo False || echo True):
  assert jax.default_backend() in ("gpu", "tpu"), f"JAX sees no accelerator (backend {jax.default_backend()})"
x = jax.numpy.ones((1024, 1024))
print("matmul check:", float((x @ x)[0, 0]))
EOF
DEVICE_OK=$?
if [ -x "$(command -v nvidia-smi)" ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/nvidia-smi.txt" 2>&1
fi

# 3. The benchmarks, one process per part (a device's peak memory is read per process).
if [ "$DEVICE_OK" = 0 ]; then
  step bench_a 170 "$PY" scripts/bench_gpu.py --size $SIZE --parts a --json "$WORK/bench_a.json"
  step bench_b 130 "$PY" scripts/bench_gpu.py --size $SIZE --parts b --json "$WORK/bench_b.json"
  step bench_d 90 "$PY" scripts/bench_gpu.py --size $SIZE --parts d --json "$WORK/bench_d.json"
  step memory 60 "$PY" scripts/gpu_memory.py --bench-json "$WORK/bench_b.json" "$WORK/bench_d.json" \
    --out "$WORK/memory.md"
  step bench_c 170 "$PY" scripts/bench_gpu.py --size $SIZE --parts c --json "$WORK/bench_c.json"
  # 4. The tests that matter on an accelerator, one file at a time, float32 products in float32 (the suite's
  #    tolerances assume it; XLA on NVIDIA GPUs may use TF32 for float32 products by default). Compiled with the
  #    caller's XLA flags only, as users compile: LABOR_JAX_TESTS_XLA_DEFAULTS=1 keeps out the suite's CPU
  #    compile-time flags (tests/suite.py), which would reach an accelerator's kernels, and which the image's jax
  #    might not know (an unknown flag stops XLA).
  for t in $TESTS; do
    n=tests_$(basename "$t" .py)
    LABOR_JAX_TESTS_XLA_DEFAULTS=1 JAX_DEFAULT_MATMUL_PRECISION=highest step "$n" 120 "$PY" -m pytest -q \
      -p no:cacheprovider -rfE "$t"
  done
else
  echo "gpu_check: the device check failed; see $WORK/device.log" >&2
fi

"$PY" scripts/gpu_report.py --work "$WORK" --out "$OUT" --size $SIZE --seconds $(( $(date +%s) - START ))
rc=$?
echo "gpu_check: report in $OUT ($(( $(date +%s) - START )) s)"
[ "$DEVICE_OK" = 0 ] && [ $rc = 0 ]
