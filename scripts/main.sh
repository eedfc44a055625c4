#!/usr/bin/env bash
# The main job on the embedded NLSY data, set-up included: bash scripts/main.sh [--out DIR]
EXTRAS="" source "$(dirname "$0")/_env.sh"
exec python -m labor_jax.main "$@"
