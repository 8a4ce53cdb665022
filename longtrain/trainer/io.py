"""File writes that readers never see half done, and file hashing.

Every file a run writes next to its training state (metrics, the resolved config, checkpoint
manifests and the ``latest`` pointer, plots) goes through :func:`atomic_write_bytes`: the bytes go
to a temporary file beside the target, are flushed to disk, and the temporary file is renamed over
the target, so a reader (or a run resumed after a crash) finds the old content or the new one.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def fsync_dir(path: PathLike) -> None:
    """Make renames and new entries in the directory ``path`` durable (where the platform can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every platform can fsync a directory


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a mix.

    The temporary file is ``.<name>.tmp`` in the same directory (a rename is atomic only within
    one file system); it is fsynced before the rename and the directory after it.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, png_path: PathLike) -> Path:
    """Write a matplotlib figure as PNG with :func:`atomic_write_bytes`; returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(png_path, buffer.getvalue())


def sha256_file(path: PathLike, sync: bool = False) -> str:
    """Hex sha256 of the file at ``path``, read in 4 MiB blocks.

    Args:
        path: the file.
        sync: also fsync the file (after it is read: the hash pass doubles as the flush).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()
