#!/usr/bin/env bash
# Run labor_jax.train on every host of a Cloud TPU VM pod slice.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash scripts/launch_tpu_pod.sh configs/llama2_13b_full.yaml [--set k=v ...]
# Each host needs this repository at the same path with `.venv` installed (pip install -e . "jax[tpu]==0.10.2"),
# the model weights and the dataset on a path every host can read. jax.distributed.initialize() finds the
# pod's hosts by itself (distributed.initialize: auto); the mesh in the config must multiply to the chip count.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
config=${1:?usage: launch_tpu_pod.sh CONFIG [--set k=v ...]}
shift
repo=${REPO_DIR:-$PWD}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $repo && .venv/bin/python -m labor_jax.train --config $config $*"
