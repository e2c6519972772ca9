#!/usr/bin/env bash
# Runs N processes of vlalign.train on this machine, each with its own CPU devices, standing in for a
# multi-host pod: every process reads its own shard and the batch is one global array.
#   launch/local_multiprocess.sh 2 --config=configs/clip.py:tiny --workdir=/tmp/mp
set -euo pipefail
NUM_PROCESSES="${1:?usage: $0 NUM_PROCESSES [train flags...]}"
shift
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m vlalign.train "$@" \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
