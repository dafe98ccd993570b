"""Files replaced whole: written beside their final name, flushed to disk, then renamed over it.

A reader (another ``dgg bench`` sharing the directory, ``dgg report``, a user's editor) sees the old file or the
new one, never an empty or half-written one, and a crash mid-write leaves the old file as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) in one rename."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
