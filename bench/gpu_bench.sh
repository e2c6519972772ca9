#!/usr/bin/env bash
# Issue 10's GPU figures in one run of a lent device machine (the `device` tool of the tool library:
# one H100/H200, no network, its own Python 3.12 with JAX 0.11 and CUDA). Two steps:
#
#   bench/gpu_bench.sh prepare     # here, where pip reaches the registries: wheels into .whl/ (~7 MB)
#   bash bench/gpu_bench.sh run    # there: device run, carry [".whl"], timeout_s 560
#
# `prepare` downloads, for CPython 3.12 on x86-64, the wheels of our dependencies that the device
# image lacks or holds at other versions (versions from requirements.txt), and adds .whl/ to
# .git/info/exclude. JAX itself cannot travel (the CUDA wheels are far over the 64 MiB a call
# carries): the device's own JAX runs, and the log records its version.
#
# `run` installs the wheels into /tmp/site, prints the versions and the device, runs a tiny step
# first (a broken install or an API change fails in seconds, not after a long compile), then
# bench/train_bench.py on each of BENCH_ROWS, one process per row, so that one that runs out of
# memory leaves the others' rows. Everything goes to $OUT/gpu_bench.log (and to stdout).
# BENCH_ROWS is "config|flags;config|flags;..." (default: CLIP ViT-B/16 at 224 px, text 77, bf16,
# at two batch sizes and once with cuDNN's flash attention in the image tower
# (bench/attention_config.py), and the full TCL step at two batch sizes, to compare with ALBEF's
# ~90 pairs/s per A100). Each row costs one compile (about a minute) and BENCH_FLAGS' steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEEL_PACKAGES=(grain array_record ml_collections flax optax orbax-checkpoint einops)

pin() {  # `name==version` of $1 from requirements.txt
  grep -i -E "^$1==" requirements.txt || { echo "no pin for $1 in requirements.txt" >&2; exit 2; }
}

prepare() {
  local specs=(portpicker==1.6.0)  # grain's dependency, not in our requirements (pip pulls it)
  for p in "${WHEEL_PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
  rm -rf .whl && mkdir .whl
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  du -sh .whl
}

run() {
  local log="${OUT:-/tmp}/gpu_bench.log"
  exec > >(tee "$log") 2>&1
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
  export PYTHONUNBUFFERED=1
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c 'import sys, jax, jaxlib, flax, optax, grain
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "flax", flax.__version__, "optax", optax.__version__, "grain", grain.__version__)
print(jax.devices())'
  local flags="${BENCH_FLAGS:---warmup=3 --steps=5 --rounds=3}"
  local smoke="${BENCH_SMOKE:-configs/clip.py:tiny}"
  echo "== smoke: $smoke"
  "$PYTHON" bench/train_bench.py --config="$smoke" --warmup=1 --steps=2 --rounds=1
  local default_rows="configs/clip.py:full|--config.batch_size=2048"
  default_rows+=";bench/attention_config.py:clip.full.cudnn|--config.batch_size=2048"
  default_rows+=";configs/clip.py:full|--config.batch_size=4096"
  default_rows+=";configs/tcl.py:full|--config.batch_size=64"
  default_rows+=";configs/tcl.py:full|--config.batch_size=256"
  local rows status=0
  IFS=';' read -r -a rows <<< "${BENCH_ROWS:-$default_rows}"
  for row in "${rows[@]}"; do
    local config="${row%%|*}" extra=""
    [[ "$row" == *"|"* ]] && extra="${row#*|}"
    echo "== $config $extra ($(date -u +%T))"
    # shellcheck disable=SC2086  # $flags and $extra are lists of flags
    "$PYTHON" bench/train_bench.py --config="$config" $extra $flags || {
      status=$?
      echo "== FAILED ($status): $config $extra"
    }
  done
  date -u
  return "$status"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
