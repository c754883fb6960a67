"""File locks (flock(2)), by which processes share a run directory, and what to say where a file system has none.

Lustre mounted without `-o flock`, NFS without its lock service and some network file systems answer flock with an
error instead of a lock: shards, a second copy of a command and a resume after it could not tell who makes what, so
that is one `UserError` naming the way out, not a traceback, nor every class taken for another process's.
"""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

from seedselect_cli.errors import UserError


def lock(fd: int, operation: int, path: Path) -> bool:
    """flock(2) `operation` (LOCK_EX or LOCK_SH, with LOCK_NB or without) on `fd`, the open file `path`: True once
    held; False where LOCK_NB found it held by another process. `UserError` where the file system gives no locks."""
    try:
        fcntl.flock(fd, operation)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise UserError(f"cannot lock {path} ({exc.strerror}): its file system gives no file locks, by which "
                        f"processes share a run directory; pass a hydra.run.dir on a local disk or on a file system "
                        f"mounted with locks (Lustre: -o flock)") from None
    return True
