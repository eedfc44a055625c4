"""``python -m tests.limited BYTES MODULE [args]``: runs ``python -m MODULE args`` under a file size limit of
BYTES (``RLIMIT_FSIZE``, SIGXFSZ ignored so that a write past it fails with EFBIG, as one on a full disk
fails with ENOSPC). Set here, in the child, rather than by a ``preexec_fn`` in the multithreaded test
process (forking a process that runs JAX threads may deadlock). JAX's persistent compilation cache, which the suite
shares between processes, is off here: a write cut short by the limit must not leave a truncated entry for others."""

import os
import resource
import runpy
import signal
import sys

if __name__ == "__main__":
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  limit, module, *args = sys.argv[1:]
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
