"""What a command is told to write: an output path is replaced only when it holds an earlier output of the same kind
(a training run, a dataset, an input folder or a file named as --out is refused in one line and left as it was), a
directory appears whole, and a run whose set-up fails leaves no directory behind."""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from data_pipeline import build, errors
from data_pipeline.errors import WriteError
from labor_jax import fileio
from labor_jax.cli import export, forecast
from labor_jax.config import ConfigError
from labor_jax.training import config as train_config
from tests.runs import ROOT, cpu_env, train_args


def _tree(path):
  """Every file under ``path`` with its bytes (a directory's whole content)."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_check_replaceable_and_the_parent_that_stops_resolving(tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "notes.txt").write_text("mine")
  (tmp_path / "ours").mkdir()
  (tmp_path / "ours" / "report.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  listed = sorted(os.listdir(tmp_path))
  for ok in ("absent", "ours", "empty", "absent/deeper/still"):
    fileio.check_replaceable(tmp_path / ok, "report.json")
  assert sorted(os.listdir(tmp_path)) == listed  # the write probe leaves nothing behind
  # where nothing can be written: said before any work, not by the temporary directory's lock after it
  with pytest.raises(ConfigError, match=r"out cannot be made: \S+file is not a directory"):
    fileio.check_replaceable(tmp_path / "file" / "deeper" / "out", "report.json")
  if os.path.isdir("/proc/self"):  # a pseudo file system: no file can be made there, even by root
    with pytest.raises(WriteError, match="cannot be written: no file can be made in /proc"):  # an OSError: exit 3
      fileio.check_replaceable("/proc/labor_jax-out", "report.json")
    fileio.check_replaceable("/proc/labor_jax-out", "report.json", writer=False)  # another host's file system
  # the folder the writer writes in, links followed (as atomic_dir resolves it), not "link/.." read as text
  (tmp_path / "deep" / "sub").mkdir(parents=True)
  (tmp_path / "theirs" / "link").symlink_to(tmp_path / "deep" / "sub")
  assert errors._writer_parent(tmp_path / "theirs" / "link" / ".." / "out") == str(tmp_path / "deep")
  with pytest.raises(ConfigError, match="file exists and is not a directory"):
    fileio.check_replaceable(tmp_path / "file", "report.json")
  with pytest.raises(ConfigError, match=r"theirs holds files that are not an earlier report \(no report.json there\)"):
    fileio.check_replaceable(tmp_path / "theirs", "report.json", "report")
  # "run/../out" with run replaced: the path is resolved first, so setting "out" aside keeps the parent reachable
  (tmp_path / "run").mkdir()
  with fileio.atomic_dir(tmp_path / "run" / ".." / "run") as tmp:
    (tmp / "new.txt").write_text("new")
  assert _tree(tmp_path / "run") == {"new.txt": b"new"}


def test_a_rename_that_keeps_failing_raises_instead_of_spinning(tmp_path, monkeypatch):
  new, path = tmp_path / "new", tmp_path / "path"
  new.mkdir()
  path.mkdir()
  (path / "earlier.txt").write_text("the earlier output")
  rename = os.rename

  def refuse(src, dst):
    if os.fspath(src) == os.fspath(new):
      raise PermissionError(13, "Permission denied", os.fspath(dst))
    rename(src, dst)
  monkeypatch.setattr(fileio.os, "rename", refuse)
  with pytest.raises(PermissionError):
    fileio._replace(new, path, attempts=5)
  assert _tree(path) == {"earlier.txt": b"the earlier output"}  # put back, not deleted


def test_cleaning_up_never_removes_a_writer_that_takes_its_lock_meanwhile(tmp_path, monkeypatch):
  """A writer makes its lock file, then takes the lock, then makes its directory. Another writer's clean-up that finds
  the lock free in between (the lock taken and released at once) must not then remove the directory made after it
  looked: it did, when it looked for the directory after the lock (a FileNotFoundError in the first writer)."""
  fd, lock = tempfile.mkstemp(prefix=".out.tmp-", suffix=fileio.LOCK, dir=tmp_path)  # writer A, lock not yet taken
  tmp = tmp_path / os.path.basename(lock)[:-len(fileio.LOCK)]
  writer_gone = fileio._writer_gone

  def writer_a_goes_on():  # A takes its lock and makes its directory
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp.mkdir(exist_ok=True)

  def then_writer_a_goes_on(path):  # the lock was free when the clean-up tried it; A goes on just after
    free = writer_gone(path)
    writer_a_goes_on()
    return free
  monkeypatch.setattr(fileio, "_writer_gone", then_writer_a_goes_on)
  assert fileio.remove_stale(tmp_path, "out") == []
  writer_a_goes_on()  # (when the clean-up did not try the lock at all)
  assert tmp.is_dir()  # A's directory, still there for it to write into
  os.close(fd)  # A is killed: the next clean-up removes its directory and lock
  monkeypatch.setattr(fileio, "_writer_gone", writer_gone)
  assert fileio.remove_stale(tmp_path, "out") == [tmp] and os.listdir(tmp_path) == []


def test_export_never_replaces_its_own_run_or_a_file(tmp_path, uninterrupted, capsys):
  run = tmp_path / "run"
  shutil.copytree(uninterrupted, run)
  before = _tree(run)
  victim = tmp_path / "notes.txt"
  victim.write_text("keep me")
  for out, said in ((run, "holds files that are not an earlier Hugging Face checkpoint (no config.json there)"),
                    (tmp_path / "run" / ".." / "run", "no config.json there"),
                    (victim, "exists and is not a directory")):
    assert export.main(["--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err
  assert _tree(run) == before and victim.read_text() == "keep me"
  assert export._shard_size("500mb") == "500MB" and export._shard_size("1000") == 1000
  assert export.main(["--run", str(run), "--out", str(tmp_path / "hf"), "--base-model", "x"]) == 2
  assert "--adapter-only" in capsys.readouterr().err
  # an earlier export is replaced whole
  assert export.main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0
  (tmp_path / "hf" / "stale.txt").write_text("from before")
  assert export.main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0
  assert not (tmp_path / "hf" / "stale.txt").exists()


def test_evaluate_refuses_a_dataset_as_its_output_before_scoring(uninterrupted, nlsy_dataset):
  from labor_jax import evaluation
  before = _tree(nlsy_dataset)
  with pytest.raises(ConfigError, match="not an earlier evaluation report"):
    evaluation.evaluate(uninterrupted, "test", nlsy_dataset, career=False, bootstrap=0)
  assert _tree(nlsy_dataset) == before


def test_build_refuses_its_input_folder_and_names_a_missing_tokenizer(tmp_path, capsys):
  folder = tmp_path / "survey"
  folder.mkdir()
  panel = folder / "panel.csv"
  panel.write_text("person_id,year,occupation\n1,1990,4\n1,1991,22\n2,1990,13\n")
  (folder / "notes.txt").write_text("field notes")
  before = _tree(folder)
  assert build.main(["--panel", str(panel), "--titles", "occ1990dd", "--out", str(folder)]) == 2
  err = capsys.readouterr().err
  assert "holds files that are not an earlier dataset (no summary.json there)" in err and err.count("\n") == 1
  assert _tree(folder) == before
  missing = tmp_path / "no_such_tokenizer"
  assert build.main(["--tokenizer-dir", str(missing), "--out", str(tmp_path / "d")]) == 2
  err = capsys.readouterr().err
  assert str(missing) in err and "no tokenizer.json or tokenizer.model" in err and not (tmp_path / "d").exists()


def test_forecast_replaces_an_earlier_forecast_whole_and_refuses_split_with_history(tmp_path, uninterrupted, capsys):
  out = tmp_path / "f"
  history = tmp_path / "w.json"
  history.write_text(json.dumps({"sex": "female", "history": [{"year": 1980, "occupation": "1"}]}))
  assert forecast.main(["--run", str(uninterrupted), "--out", str(out), "--years", "1", "--samples", "2"]) == 0
  assert (out / "transitions.csv").exists()
  assert forecast.main(["--run", str(uninterrupted), "--history", str(history), "--out", str(out), "--years", "1",
                        "--samples", "2"]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["forecast.json", "paths.csv"]  # no split's files left beside it
  with pytest.raises(SystemExit):
    forecast.main(["--run", str(uninterrupted), "--history", str(history), "--split", "train", "--out", str(out)])
  assert "give one of them" in capsys.readouterr().err


def test_a_new_run_whose_set_up_fails_leaves_no_directory(tmp_path, nlsy_dataset, uninterrupted):
  """...and an existing run named through a path that does not exist yet ("new/../existing") is not new."""
  existing = tmp_path / "existing"
  shutil.copytree(uninterrupted, existing)
  before = _tree(existing)
  for run in (tmp_path / "new_run", tmp_path / "new" / ".." / "existing"):
    p = subprocess.run([sys.executable, "-m", "labor_jax.train",
                        *train_args(run, nlsy_dataset, f"model.hf_path={tmp_path / 'no_such_model'}", "steps=2")],
                       cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("config error:"), p.stderr[-2000:]
  assert not (tmp_path / "new_run").exists()
  assert _tree(existing) == before


def test_config_values_a_run_cannot_use_name_their_file(tmp_path):
  listed = tmp_path / "list.yaml"
  listed.write_text("- steps: 3\n")
  with pytest.raises(ConfigError, match="list.yaml: a run config is a mapping of keys to values, not a list"):
    train_config.load(listed)
  for override, said in (("optim.lr=.nan", "optim.lr: must be a positive number"),
                         ("optim.lr=-1", "optim.lr: must be a positive number"),
                         ("optim.warmup_steps=-30", "optim.warmup_steps: must be a finite number >= 0"),
                         ("batch_size=-4", "batch_size: must be a finite positive number"),
                         # each of these stopped later with a traceback, trained on, or diverged (probe, 2026-12-05)
                         ("model.num_attention_heads=0", "model.num_attention_heads: must be a finite positive number"),
                         ("model.max_position_embeddings=0", "model.max_position_embeddings: must be a finite positive"),
                         ("data.vocab_size=0", "data.vocab_size: must be a finite positive number"),
                         ("epochs=.nan", "epochs: must be a finite positive number, got nan"),
                         ("eval_every_epochs=.inf", "eval_every_epochs: must be a finite positive number, got inf"),
                         ("eval_batches=-1", "eval_batches: must be a finite number >= 0"),
                         ("ckpt_every_minutes=.inf", "ckpt_every_minutes: must be a finite number >= 0, got inf"),
                         ("lora.alpha=.nan", "lora.alpha: must be a positive number"),
                         ("lora.dropout=1.5", r"lora.dropout: a probability in \[0, 1\)")):
    with pytest.raises(ConfigError, match=f"^configs/demo.yaml with --set: {said}"):
      train_config.load("configs/demo.yaml", [override])
  # an empty value (an empty shell variable) took the default in silence; a section set whole took every default
  for override, said in (("steps=", "no value (write steps=null for null)"),
                         ("model=null", "model is a section; set its keys (model.KEY=VALUE)")):
    with pytest.raises(ConfigError, match=re.escape(f"--set {override!r}: {said}")):
      train_config.load("configs/demo.yaml", [override])
  assert train_config.load("configs/demo.yaml", ["steps=null"]).steps == train_config.DEFAULT_STEPS["steps"]
  from labor_jax.config import LlamaConfig  # a preset or config.json with a zero size: one line, not ZeroDivisionError
  with pytest.raises(ConfigError, match="num_attention_heads: must be a positive integer, got 0"):
    LlamaConfig(num_attention_heads=0)
  with pytest.raises(ConfigError, match="^x/config.json: num_attention_heads: must be a positive integer, got 0"):
    LlamaConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                              "num_hidden_layers": 1, "num_attention_heads": 0}, source="x/config.json")


def test_gguf_conversion_names_a_directory_and_refuses_a_foreign_output(tmp_path, capsys):
  from labor_jax.cli import gguf as gguf_cli
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "notes.txt").write_text("mine")
  assert gguf_cli.main([str(tmp_path / "any.gguf"), "--out", str(tmp_path / "theirs")]) == 2
  assert "not an earlier Hugging Face checkpoint" in capsys.readouterr().err
  assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"
  assert gguf_cli.main([str(tmp_path / "theirs"), "--out", str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err
  assert "theirs: a directory, not a .gguf file" in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()
