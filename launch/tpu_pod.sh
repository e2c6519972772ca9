#!/usr/bin/env bash
# Runs vlalign.train on every worker of a Cloud TPU pod slice. JAX finds the other workers itself.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/clip.py:full \
#     --workdir=gs://my-bucket/clip_full
# The repo must be at ~/vlalign on every worker (e.g. `gcloud ... --worker=all --command="git clone ..."`).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
# Each argument shell-quoted, so that spaces and quotes reach the remote command intact.
printf -v ARGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/vlalign && .venv/bin/python -m vlalign.train --jax_distributed${ARGS}"
