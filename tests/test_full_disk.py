"""Full disks (issue #21 item 3): a dataset build, a checkpoint save or an export that runs out of space.

The disk is filled with a file size limit (``RLIMIT_FSIZE`` in the subprocess, SIGXFSZ ignored so a
write past it fails with EFBIG, as one on a full disk fails with ENOSPC): portable, no root, no mount.
The command stops with one line naming what it could not write and why, nothing half-written is
left, and (training) the last good checkpoint stays readable and the next run resumes from it.
"""

import os
import re
import subprocess
import sys

import pytest

from labor_jax.cli import export, train
from tests.runs import ROOT, cpu_env, read_metrics, run_train, train_args


def _limited(nbytes, module, *args):
  """The command line of ``python -m module args`` under a file size limit of ``nbytes`` (tests/limited.py)."""
  return [sys.executable, "-m", "tests.limited", str(nbytes), module, *args]


@pytest.mark.parametrize("limit, victim", [(3_000, "tokenizer/tokenizer.model"),
                                           (30_000, "labor_resumes-train.array_record")])
def test_build_on_a_full_disk_says_so_in_one_line_and_leaves_the_old_dataset(tmp_path, limit, victim):
  rows = ["person_id,year,occupation"] + [f"{p},{y},Title {(p * 7 + y) % 40} of trade {p % 3}"
                                          for p in range(200) for y in range(1980, 1990)]
  panel = tmp_path / "panel.csv"
  panel.write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  out.mkdir()
  (out / "summary.json").write_text('{"old": true}')  # an earlier dataset: it must survive the failed build
  p = subprocess.run(_limited(limit, "data_pipeline.build", "--panel", str(panel), "--out", str(out),
                              "--vocab-size", "400"), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 3, p.stderr[-2000:]
  lines = p.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: cannot write the dataset {out} ("), p.stderr
  assert victim in lines[0] and ("file size limit" in lines[0] or "disk is full" in lines[0])
  assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "panel.csv"]  # no temporary sibling left
  assert [x.name for x in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == '{"old": true}'


def test_checkpoint_save_on_a_full_disk_stops_cleanly_and_the_rerun_resumes(tmp_path, nlsy_dataset):
  """Step 2 saves; the disk is full from step 4's save on: exit 4 with one line, step 2 readable, no trace of
  step 4; the same command without the limit resumes from step 2 and finishes."""
  from labor_jax.checkpoint import restore_params
  run_dir = tmp_path / "run"
  extra = ["steps=4", "ckpt_every=2", "eval_every=2"]
  env = cpu_env(1)
  p = subprocess.run([sys.executable, "-m", "tests.full_disk_train", "4", "20000",
                      *train_args(run_dir, nlsy_dataset, *extra)], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == train.EXIT_WRITE, p.stderr[-3000:]
  # orbax's background threads log their own tracebacks (before or, racing, after), and a line of theirs may
  # still be open when the verdict is printed, so the verdict is found where it starts, not at a line start; it
  # is printed once, and no other line is an error of ours.
  verdict = re.findall(r"error: cannot write checkpoint[^\n]*", p.stderr)
  assert len(verdict) == 1, p.stderr[-3000:]
  assert [line for line in p.stderr.splitlines() if line.startswith("error:")] in ([], verdict), p.stderr[-3000:]
  last = verdict[0]
  assert last.startswith(f"error: cannot write checkpoint step 4 in {run_dir / 'checkpoints'}")
  assert "file size limit" in last and "step 2 is kept" in last
  assert 'File "' + str(ROOT / "labor_jax") not in p.stderr  # no traceback through our code
  assert sorted(x.name for x in (run_dir / "checkpoints").iterdir()) == ["2"]
  step, params = restore_params(run_dir / "checkpoints")
  assert step == 2 and params

  code, out, err = run_train(run_dir, nlsy_dataset, *extra)
  assert code == 0, err
  assert "resumed from step 2" in out
  assert sorted(x.name for x in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
  assert restore_params(run_dir / "checkpoints")[0] == 4
  assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 3, 4]

  # An export of that run onto a full disk: exit 3, one line, the earlier export at --out kept whole.
  export_args = ["--run", str(run_dir), "--out", str(tmp_path / "hf")]
  assert export.main(export_args) == 0
  before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}
  p = subprocess.run(_limited(20_000, "labor_jax.export", *export_args, "--step", "2"), cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == export.EXIT_WRITE, p.stderr[-3000:]
  lines = p.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: cannot write the export {tmp_path / 'hf'}"), p.stderr
  assert "file size limit" in lines[0] and "nothing was written" in lines[0]
  assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
  assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []  # no temporary sibling
