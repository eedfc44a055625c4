"""``python -m tests.full_disk_train STEP BYTES [labor_jax.train args]``: the trainer with a file size limit of
BYTES (``RLIMIT_FSIZE``, SIGXFSZ ignored so writes fail with EFBIG, as on a full disk) set just before the
checkpoint save of STEP, so that earlier steps save and that one cannot. The limit lives here, not in the
library. JAX's persistent compilation cache, which the suite shares between processes, is off here: a write cut
short by the limit must not leave a truncated entry for others."""

import os
import resource
import signal
import sys

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # before JAX is imported

from labor_jax import checkpoint  # noqa: E402
from labor_jax.cli import train  # noqa: E402

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
