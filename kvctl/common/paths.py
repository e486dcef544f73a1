"""kvctl's cache folder and the one way it writes a file that readers may race with."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from kvctl.common.defaults import CACHE_DIR_ENV, XDG_CACHE_HOME_ENV, env


def cache_root() -> Path:
    """Where kvctl keeps derived files (``$KVCTL_CACHE_DIR``, else ``~/.cache/kvctl``)."""
    named = env(CACHE_DIR_ENV)
    if named:
        return Path(named).expanduser()
    base = env(XDG_CACHE_HOME_ENV) or str(Path.home() / ".cache")
    return Path(base) / "kvctl"


def file_tag(path: Path) -> str:
    """A short key for a source file's current content: size and mtime are in it, so a
    replaced file is converted again."""
    st = path.stat()
    return hashlib.blake2b(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(),
                           digest_size=6).hexdigest()


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix.

    The temporary file sits beside ``path`` (same filesystem, so the rename is atomic) and is
    named ``.NAME.*.tmp`` so a reader can recognise and sweep leftovers after a crash.
    ``durable`` fsyncs before the rename: a crash then never leaves an empty file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
