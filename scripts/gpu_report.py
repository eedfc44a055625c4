"""The report of scripts/gpu_check.sh: one markdown file from the steps' logs and JSON files.

  python scripts/gpu_report.py --work gpu_report.md.d --out gpu_report.md --size full --seconds 431

Sections: the machine (device, driver, memory, package versions, date), the steps (status and seconds), the
benchmark table (scripts/bench_gpu.py's columns), memory plan against measurement (scripts/gpu_memory.py) and
the test files run on the accelerator (pytest's closing line and the failures it named).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def last_match(text: str, pattern: str) -> str | None:
  found = re.findall(pattern, text, re.M)
  return found[-1] if found else None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--work", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--size", default="full")
  ap.add_argument("--seconds", type=int, default=None)
  args = ap.parse_args(argv)
  from bench_gpu import table  # the benchmark's own table writer

  w = args.work
  steps = [line.split("\t") for line in read(f"{w}/steps.tsv").splitlines() if line.strip()]
  device = last_match(read(f"{w}/device.log"), r"^devices: (.*)$") or "unknown (the device check failed)"
  smi = read(f"{w}/nvidia-smi.txt").strip() or "n/a"
  versions = last_match(read(f"{w}/imports.log"), r"^versions: (.*)$") or "n/a (the import check failed)"
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  out = [f"# gpu_check ({'dry run, tiny sizes on the CPU' if args.size == 'tiny' else 'size ' + args.size})", "",
         f"- device: {device}", f"- nvidia-smi (name, driver, memory): {smi}", f"- packages: {versions}",
         f"- date: {date}" + (f"; all steps {args.seconds} s" if args.seconds is not None else ""), "",
         "## Steps", "", "| step | status | seconds |", "| --- | --- | ---: |"]
  out += [f"| {name} | {status} | {secs} |" for name, status, secs in steps]

  rows = []
  for part in "abdc":
    path = f"{w}/bench_{part}.json"
    if os.path.exists(path):
      with open(path) as f:
        rows += json.load(f)
  out += ["", "## Benchmarks (scripts/bench_gpu.py)", ""]
  out += [table(rows)] if rows else ["no benchmark part finished"]
  memory = read(f"{w}/memory.md").strip()
  out += ["", "## Memory: plan against the device (scripts/gpu_memory.py)", "", memory or "not measured"]

  out += ["", "## Tests on the device", "", "| file | pytest's closing line | failures |", "| --- | --- | --- |"]
  for name, status, _ in steps:
    if not name.startswith("tests_"):
      continue
    log = read(f"{w}/{name}.log")
    closing = last_match(log, r"^=*\s*(\d+ (?:passed|failed|error|skipped).*?)\s*=*$") or status
    failures = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)))
    out.append(f"| {name[len('tests_'):]}.py | {closing} | {', '.join(f.split('::')[-1] for f in failures) or '-'} |")
  text = "\n".join(out) + "\n"
  with open(args.out, "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
