"""Every ```python block of README.md and docs/*.md runs, in page order, against a tiny run.

The collector is sybil (10.1.0): its markdown parsers find the fenced blocks and its skip directive,
``<!-- skip: next "reason" -->`` on the line before a block, marks one that cannot run here (the
reason shows in the page's source and in pytest's skip report). Why sybil rather than
pytest-markdown-docs, pytest-codeblocks or mktestdocs: it alone has both a skip mark that carries a
reason and an API to parse a page into examples that share one namespace (the blocks of a page read
like a notebook), so the blocks become parametrized tests of this file. That keeps them under
``pytest tests`` (scripts/test.sh) and in one pytest-xdist group (--dist loadfile), next to the
session fixtures of tests/conftest.py, with no conftest outside tests/ and no change to how pytest is
called.

The blocks run in a temporary directory laid out as the pages assume:

- ``runs/demo``: a copy of the session's tiny 8-step run (``uninterrupted``), ``runs/demo/data``
  the session's NLSY dataset it trained on (``nlsy_dataset``), as ``configs/demo.yaml`` lays them out;
- ``path/to/llama`` (also ``Llama-2-7b-hf`` and ``exported/base``): a random tiny Llama in Hugging Face
  format with the run's tokenizer (4 query and 2 key/value heads, so that a ``tensor=2`` mesh divides it);
- ``exported/adapter`` (also ``my_adapter``): a PEFT LoRA adapter on it, written by labor_jax;
- ``model.gguf``: a random tiny GGUF file (tests/gguf_fixtures.py), converted into a cache of its own.
"""

import shutil
import unittest
from pathlib import Path

import numpy as np
import pytest
from sybil import Sybil
from sybil.evaluators.skip import Skipper
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])
DOCUMENTS = {page: SYBIL.parse(page) for page in PAGES}


def is_block(example) -> bool:
  """A Python block, not a skip mark (sybil parses both into examples)."""
  return not isinstance(example.region.evaluator, Skipper)


EXAMPLES = [(page, i) for page, doc in DOCUMENTS.items() for i, e in enumerate(doc.examples()) if is_block(e)]


def _id(case) -> str:
  page, i = case
  example = list(DOCUMENTS[page].examples())[i]
  return f"{page.relative_to(ROOT)}:{example.line}"


def _tiny_hf(ws: Path, run_dir: Path) -> None:
  """A random tiny Llama in HF format with the run's tokenizer, a PEFT adapter on it, and their aliases."""
  import jax
  from labor_jax import inference, lora, model
  from labor_jax.interop import hf, peft
  from labor_jax.rundir import RunDir
  config = inference.model_config(run_dir).replace(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2)
  rng = np.random.default_rng(0)  # numpy, not model.init_params: no initialiser to compile (seconds)
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), model.param_shapes(config))
  base = ws / "path" / "to" / "llama"
  base.parent.mkdir(parents=True)
  hf.save(config, params, base, tokenizer_dir=Path(str(RunDir(run_dir).tokenizer_dir)))
  (ws / "exported").mkdir()
  lora_config, lora_params = lora.add_adapters(config, params, jax.random.key(1), rank=2, alpha=4.0,
                                               targets=r"self_attn/(q|v)_proj")
  peft.save_adapter(lora_config, lora_params, ws / "exported" / "adapter", base_model_name_or_path="exported/base")
  for alias, target in [("Llama-2-7b-hf", base), ("exported/base", base), ("my_adapter", ws / "exported" / "adapter")]:
    (ws / alias).symlink_to(target, target_is_directory=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, uninterrupted, nlsy_dataset):
  """The directory the pages' paths resolve in (see the module docstring); the blocks run with it as cwd."""
  from tests import gguf_fixtures
  ws = tmp_path_factory.mktemp("docs_examples")
  demo = ws / "runs" / "demo"
  shutil.copytree(uninterrupted, demo)
  (demo / "data").symlink_to(nlsy_dataset, target_is_directory=True)
  _tiny_hf(ws, demo)
  gguf_fixtures.write_tiny(ws / "model.gguf", gguf_fixtures.gpt2_vocab())
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LABOR_JAX_CACHE", str(ws / ".cache"))  # the GGUF conversion cache
    mp.setenv("MPLBACKEND", "Agg")  # plt.show() draws nothing
    mp.chdir(ws)
    yield ws
  import matplotlib.pyplot as plt
  plt.close("all")


# page -> index of its first block not yet run. A page's blocks run in order and share one namespace,
# so running one block alone (pytest -k) first runs the blocks above it.
_NEXT: dict = {}


@pytest.mark.parametrize("case", EXAMPLES, ids=_id)
def test_block_runs(case, workspace):
  page, i = case
  examples = list(DOCUMENTS[page].examples())
  for j in range(_NEXT.get(page, 0), i):
    _NEXT[page] = j + 1
    try:
      examples[j].evaluate()
    except unittest.SkipTest:
      pass
    except Exception as e:
      raise AssertionError(f"the block above, {page.name}:{examples[j].line}, fails: {e!r}") from e
  _NEXT[page] = i + 1
  examples[i].evaluate()


def test_every_python_fence_is_collected():
  """sybil finds as many Python blocks as there are ```python fences (a fence it missed would go untested)."""
  for page, doc in DOCUMENTS.items():
    fences = sum(line.strip().startswith("```python") for line in page.read_text(encoding="utf-8").splitlines())
    blocks = sum(map(is_block, doc.examples()))
    assert blocks == fences, f"{page.name}: {fences} ```python fences, sybil collected {blocks} blocks"


def test_skip_mark_skips_with_its_reason(tmp_path):
  """The mark the docs describe skips the next block only, with its reason."""
  page = tmp_path / "page.md"
  page.write_text('<!-- skip: next "needs a TPU pod" -->\n```python\nraise RuntimeError\n```\n\n'
                  '```python\nran = True\n```\n', encoding="utf-8")
  mark, first, second = SYBIL.parse(page).examples()
  mark.evaluate()
  with pytest.raises(unittest.SkipTest, match="needs a TPU pod"):
    first.evaluate()
  second.evaluate()
  assert second.namespace["ran"] is True
