"""The house rules of the entry points: every command answers --help through `python -m labor_jax.<command>`
and `labor-jax <command>`, and no library module imports a command-line module."""

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from labor_jax import cli

ROOT = Path(__file__).resolve().parent.parent
SHIMS = {p.stem for p in (ROOT / "labor_jax").glob("*.py")
         if "labor_jax.cli." in p.read_text() and "sys.exit(main())" in p.read_text()}


def test_every_command_has_a_shim_and_the_console_script_lists_it():
  assert SHIMS == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_python_m_help(command, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", [f"labor_jax.{command}", "--help"])
  with pytest.raises(SystemExit) as e:
    runpy.run_module(f"labor_jax.{command}", run_name="__main__")
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out


def test_console_script_dispatches(capsys):
  assert cli.run(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {name} " in out for name in cli.COMMANDS)
  assert cli.run(["no-such-command"]) == 2
  with pytest.raises(SystemExit) as e:
    cli.run(["predict", "--help"])
  assert e.value.code == 0 and "--history" in capsys.readouterr().out


def _imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
  return out


def test_library_modules_import_no_command_line_module():
  library = [p for d in ("labor_jax", "data_pipeline") for p in (ROOT / d).rglob("*.py")
             if "cli" not in p.relative_to(ROOT).parts and p.stem not in SHIMS]
  assert len(library) > 30
  bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("labor_jax.cli"))
         for p in library}
  assert {k: v for k, v in bad.items() if v} == {}


def test_the_training_wing_imports_without_a_cycle():
  """labor_jax/training/*.py import each other along a DAG (TYPE_CHECKING imports counted): the hooks
  name the Trainer of labor_jax.training.trainer, not of the loop that builds it."""
  wing = {p.stem: p for p in (ROOT / "labor_jax" / "training").glob("*.py") if p.stem != "__init__"}
  edges = {m: {n for n in wing if f"labor_jax.training.{n}" in _imports(p)} for m, p in wing.items()}
  assert "loop" not in edges["hooks"] and "trainer" in edges["hooks"] and "hooks" in edges["loop"]
  done: set[str] = set()

  def visit(m, path):
    assert m not in path, f"import cycle: {' -> '.join([*path, m])}"
    if m not in done:
      for n in edges[m]:
        visit(n, [*path, m])
      done.add(m)
  for m in wing:
    visit(m, [])


def test_training_and_scoring_commands_never_load_pytorch():
  """PyTorch is a test dependency only: the commands' modules, and the TensorBoard writer a run opens, leave it
  unloaded even where it is installed (tensorboardX would import it; labor_jax.training.hooks hides it)."""
  code = ("import sys\n"
          "import labor_jax.cli.train, labor_jax.evaluate, labor_jax.predict, labor_jax.export, labor_jax.api\n"
          "from labor_jax.training import hooks\n"
          "hooks.summary_writer_class()\n"
          "print('torch' in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "False"


def test_flags_that_would_be_ignored_are_refused_before_any_work(tmp_path, capsys):
  """Each was accepted and silently dropped (probe, 2026-12-05): the answer then came from something else than asked."""
  from labor_jax.cli import experiments, main, predict
  run = tmp_path / "run"
  run.mkdir()
  (run / "model_config.json").write_text("{}")  # what makes a directory a run
  history = tmp_path / "h.json"
  history.write_text('{"history": [{"year": 1990, "occupation": "1"}]}')
  for command, argv, said in (
      (predict, ["--hf", str(run), "--history", str(history)], "is a labor_jax.train run: use --run"),
      (predict, ["--hf", str(tmp_path / "m.gguf"), "--step", "5", "--history", str(history)],
       "--step applies to --run"),
      (main, ["--quick", "--seeds", "3"], "--quick runs one seed: leave out --seeds"),
      (experiments, ["--quick", "--seeds", "2"], "--quick runs 1 seed of 2 steps a run: leave out --seeds"),
      (experiments, ["foundation", "--quick", "--steps", "4"], "leave out --steps"),
      (experiments, ["foundation", "--tiny-llm", str(tmp_path)], "not a labor_jax.train run"),
      (predict, ["--run", str(run), "--history", str(history), "--num-processes", "-3"], "must be"),
  ):
    try:
      code = command.main(argv)
    except SystemExit as e:
      code = e.code
    err = capsys.readouterr().err
    assert code == 2 and said in err.strip().splitlines()[-1] and "Traceback" not in err, (argv, err)
