#!/usr/bin/env bash
# Run labor_jax.train on every host of a Cloud TPU VM pod slice, through one `gcloud ... ssh --worker=all`.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash scripts/launch_tpu_pod.sh [--dry-run] CONFIG [--set k=v ...]
# --dry-run prints the command instead of running it (paste it to run it).
# Optional: PROJECT (gcloud --project), REPO_DIR (the repository on the hosts; default: this directory's path).
# Each host needs this repository at REPO_DIR with `.venv` installed (pip install -e . "jax[tpu]==0.10.2"), and
# the weights and dataset on a path every host can read. On a TPU VM, distributed.initialize: auto calls
# jax.distributed.initialize() without arguments and JAX reads the pod's topology; the config's mesh must
# multiply to the slice's chip count. Every argument reaches the hosts' shell single-quoted, unchanged.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
config=${1:?usage: launch_tpu_pod.sh [--dry-run] CONFIG [--set k=v ...]}
shift
repo=${REPO_DIR:-$PWD}

# POSIX single quotes: the argument comes out of any sh unchanged ($, spaces, quotes, globs).
quote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
join_quoted() { local out="" a; for a in "$@"; do out+="${out:+ }$(quote "$a")"; done; printf '%s' "$out"; }

remote="cd $(quote "$repo") && $(join_quoted .venv/bin/python -m labor_jax.train --config "$config" "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  cmd+=(--project "$PROJECT")
fi
cmd+=(--command "$remote")

if ((dry_run)); then
  join_quoted "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
