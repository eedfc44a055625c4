"""``python -m tests.paced_train SECONDS [labor_jax.train args]``: the trainer with every step slowed
by SECONDS, so that tests can stop a run part-way (SIGKILL, SIGTERM). The pacing lives here,
not in the library."""

import sys
import time

from labor_jax.cli import train
from labor_jax.training import core as train_core

_make_train_step = train_core.make_train_step


def _paced(*args, **kwargs):
  step = _make_train_step(*args, **kwargs)
  delay = float(sys.argv[1])

  def slow(state, batch):
    out = step(state, batch)
    time.sleep(delay)
    return out
  return slow


if __name__ == "__main__":
  train_core.make_train_step = _paced
  sys.exit(train.main(sys.argv[2:]))
