"""Output locations checked before any work: a command that would fail to write after an hour of
computing must fail at once, in one line, having written nothing."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import SubnetscopeError


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """Refuse an output folder that is a file, sits below a file, or cannot be written (read-only
    folder or mount). Creates nothing: the probe file it writes in the nearest existing folder is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SubnetscopeError(f"{flag} {path} is an existing file, not a folder: pass a folder path")
    anchor = nearest_existing(path)
    if not anchor.is_dir():
        raise SubnetscopeError(f"{flag} {path}: {anchor} is a file, so no folder can be made below it: "
                               f"pass another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".subnetscope-write-check.", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise SubnetscopeError(f"{flag} {path}: cannot write in {anchor} ({reason}): pass a writable folder") from None
    return path
