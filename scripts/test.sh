#!/usr/bin/env bash
# The whole test suite, offline, on the CPU: bash scripts/test.sh [pytest args]
EXTRAS="[test]" source "$(dirname "$0")/_env.sh"
exec python -m pytest -q tests "$@"
