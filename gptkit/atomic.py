"""Writing a file so that a process killed at any moment leaves either the old file or the new one, never half.

The recipe: write a temp file in the same folder, flush and fsync it, rename it over the target (atomic on POSIX),
then fsync the folder so that the rename itself survives a power cut. Used for token files, checkpoints and their
manifests.
Try it: python -c "import atomic, pathlib; atomic.write_bytes(pathlib.Path('/tmp/x.txt'), b'hello')"
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file beside `path`, then move it into place. An OSError leaves `path` untouched
    and no temp file, and is raised again for the caller to explain; a process killed half-way leaves the temp file
    (.NAME.PID.tmp), which checkpoint.clean_stale_temp_files removes on the next start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, payload: bytes) -> None:
    """write_atomic for bytes already in memory."""
    write_atomic(path, lambda f: f.write(payload))


def fsync_dir(folder: Path) -> None:
    """Make a rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
