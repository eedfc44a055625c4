"""Scoring throughput (workers/s) of labor_jax.evaluate's scorer on one device versus a mesh of fake CPU devices.

Builds the embedded NLSY dataset, a randomly initialised demo-size Llama (configs/demo.yaml's
sizes; the weights do not change the work), and scores the test split's workers with
``evaluation.llm_scores`` (the inference layer's scoring step) on one device and on ``--devices`` devices (``data=N``), in one process,
each after a warm-up pass that compiles. Reports workers/s and the ratio, and the largest
log-probability difference between the two.

  python scripts/bench_scoring_mesh.py --devices 2 --repeats 3
"""

import argparse
import os
import sys
import tempfile
import time

from _reference import add_malloc_flag, apply_malloc_flag, cpu_line


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--devices", type=int, default=2, help="fake CPU devices of the mesh")
  ap.add_argument("--batch-workers", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3, help="timed passes over the split (best is reported)")
  add_malloc_flag(ap)
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  tuned = apply_malloc_flag(args)

  import jax
  import numpy as np

  from data_pipeline.dataset_dir import DatasetDir, build_default
  from labor_jax import evaluation, inference, model, sharding
  from labor_jax.training import config as train_config

  with tempfile.TemporaryDirectory() as d:
    build_default(f"{d}/nlsy")
    data = DatasetDir(f"{d}/nlsy")
    tok, titles = data.tokenizer(), data.titles()
    cfg = train_config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml"))
    config = train_config.model_config(cfg, vocab_size=tok.vocab_size)
    host = jax.device_get(model.init_params(config, jax.random.key(0)))
    workers = len(data.source("test"))
    results = {}
    for name, mesh in [("1 device", None), (f"data={args.devices}", sharding.make_mesh(data=args.devices))]:
      params = jax.device_put(host) if mesh is None else jax.device_put(host, model.param_shardings(config, mesh))
      loaded = inference.Loaded(config, params, tok, "random init", inference.HF, "demo-size random model", mesh)

      def once():
        t0 = time.perf_counter()
        df = evaluation.llm_scores(loaded, titles, data.variant, data, "test", batch_workers=args.batch_workers)
        return time.perf_counter() - t0, np.stack(df["llm_norm"].to_numpy())
      once()  # compiles
      best, scores = min((once() for _ in range(args.repeats)), key=lambda r: r[0])
      results[name] = (best, scores)
      print(f"{name:10s} {workers / best:8.1f} workers/s ({best:.2f} s for {workers} workers, best of {args.repeats})",
            flush=True)
  (t1, s1), (tn, sn) = results.values()
  print(f"cpu: {cpu_line()}; jax {jax.__version__}")
  print(f"ratio {args.devices} devices / 1 device = {t1 / tn:.2f}x; max |log-prob difference| "
        f"{np.abs(s1 - sn).max():.1e}; allocator tuning {'on' if tuned else 'off'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
