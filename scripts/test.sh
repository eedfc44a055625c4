#!/usr/bin/env bash
# The whole test suite, offline, on the CPU: bash scripts/test.sh [pytest args]
# Two pytest-xdist workers, one test file each at a time (file-scoped fixtures stay in one worker).
EXTRAS="[test]" source "$(dirname "$0")/_env.sh"
exec python -m pytest -q -n 2 --dist loadfile tests "$@"
