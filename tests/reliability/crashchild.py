"""A child process that runs stages and dies by SIGKILL at a chosen write, for the crash tests.

    python -m tests.reliability.crashchild --run R --config C --stages extract

With SAE_CXR_KILL="<name suffix>:<n>:<phase>" the process kills itself (SIGKILL, no cleanup, no
atexit, exactly what `kill -9` does) at the n-th rename into a file whose name ends with the
suffix, at one of three phases:
  half    the temporary file is cut to half its length first: death in the middle of a write
  before  the temporary file is complete but not yet renamed
  after   right after the rename, before the directory fsync and anything that follows
Every writer in the package renames through `os.replace` (run.atomic_path), so this one hook reaches
shards, checkpoints, weights, tables and the manifest alike.
"""

from __future__ import annotations

import os
import signal
import sys


def install(spec: str) -> None:
    suffix, n, phase = spec.rsplit(":", 2)
    target, count = int(n), [0]
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if str(dst).endswith(suffix):
            count[0] += 1
            if count[0] == target:
                if phase == "half":
                    size = os.path.getsize(src)
                    with open(src, "rb+") as f:
                        f.truncate(size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
                if phase == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst, *a, **kw)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace


if __name__ == "__main__":
    if os.environ.get("SAE_CXR_KILL"):
        install(os.environ["SAE_CXR_KILL"])
    from tests.reliability.tiny import main

    sys.exit(main())
