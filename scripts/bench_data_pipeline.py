"""Data pipeline throughput: simulate, validate, render, train a tokenizer, tokenize and write.

  python scripts/bench_data_pipeline.py --workers 100000 --years 20 --occupations 330

Simulated data (data_pipeline.simulator), 2 CPU cores. Reports seconds per stage and
records (person-years) per second for the whole build.
"""

import argparse
import os
import tempfile
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workers", type=int, default=100_000)
  ap.add_argument("--years", type=int, default=20)
  ap.add_argument("--occupations", type=int, default=330)
  args = ap.parse_args()

  from data_pipeline import dataset_dir, simulator
  from data_pipeline.panel import validate
  from data_pipeline.titles import synthetic_titles

  titles = synthetic_titles(args.occupations)
  t0 = time.perf_counter()
  raw = simulator.simulate(args.workers, args.years, titles, seed=0)
  t1 = time.perf_counter()
  panel, titles = validate(raw, "simulated", titles)
  t2 = time.perf_counter()
  with tempfile.TemporaryDirectory() as d:
    info = dataset_dir.build_dataset(panel, titles, os.path.join(d, "out"), source="simulated")
  t3 = time.perf_counter()
  sec = info["seconds"]
  n = len(panel)
  print(f"{args.workers:,} workers x {args.years} years ({n:,} person-years, {args.occupations} occupations), "
        f"{os.cpu_count()} CPU cores")
  print(f"simulate             {t1 - t0:7.1f} s   (not part of the build)")
  print(f"validate             {t2 - t1:7.1f} s")
  print(f"render resumes       {sec['render']:7.1f} s")
  print(f"train SentencePiece  {sec['tokenizer_training']:7.1f} s")
  print(f"tokenize             {sec['tokenize']:7.1f} s   ({info['tokens']:,} tokens)")
  print(f"write TFDS           {sec['write_tfds']:7.1f} s")
  total = t3 - t1
  print(f"build total          {total:7.1f} s   = {n / total:,.0f} records/s  (goal: under 60 s)")


if __name__ == "__main__":
  main()
