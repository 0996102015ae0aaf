"""Writing files so that a crash never leaves a half-written one (checkpoints, heads,
schedules, figures): write a temporary file in the same folder, then ``os.replace`` it.

A file that is replaced keeps its permission bits (a private ``0600`` file stays private); a
new file gets the mode a plain ``open(path, "w")`` would give it (``0666`` less the umask)."""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file
    written there replaces ``path`` in one step, otherwise it is removed and ``path`` is left
    as it was.

    The new file takes the permission bits of the file it replaces (of the file a symbolic
    link points to, for a link); a new file gets ``0666`` less the umask, as ``open`` gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(path))  # mkstemp creates it private (0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mode_for(path: Path) -> int:
    """Permission bits for the file that will be at ``path``: those of the file there now,
    else ``0666`` less the process umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the umask can only be read by setting it
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
