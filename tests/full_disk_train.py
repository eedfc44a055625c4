"""``python -m tests.full_disk_train STEP BYTES [labor_jax.train args]``: the trainer with a file size limit of
BYTES (``RLIMIT_FSIZE``, SIGXFSZ ignored so writes fail with EFBIG, as on a full disk) set just before the
checkpoint save of STEP, so that earlier steps save and that one cannot. The limit lives here, not in the
library."""

import resource
import signal
import sys

from labor_jax import checkpoint
from labor_jax.cli import train

_save = checkpoint.save


def _save_then_fill(mgr, step, *args, **kwargs):
  if step >= int(sys.argv[1]):
    mgr.wait_until_finished()  # earlier steps' async writes finish under no limit
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return _save(mgr, step, *args, **kwargs)


if __name__ == "__main__":
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  checkpoint.save = _save_then_fill
  sys.exit(train.main(sys.argv[3:]))
