"""One process at a time: an exclusive lock on a file (fcntl on POSIX, msvcrt on Windows)."""

import contextlib
import os
import time


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on `path` (created if missing) for the block; waits for other holders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+b") as f:
        if os.name == "nt":
            import msvcrt
            while True:
                f.seek(0)
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(0.2)
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
