"""Explain's Markdown files: a private temporary folder that the server removes when it ends.

A client that cannot show Markdown itself is sent `window/showDocument` of a file (DESIGN.md, wire
contract). The explained code may be confidential, so the folder is the user's alone (0700, from
`tempfile.mkdtemp`) and so are its files (0600). It is removed at shutdown, at exit, and when the
interpreter ends without either (atexit); these are the only files the server writes.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from pathlib import Path

FOLDER_PREFIX = "codellama-explain-"


class ExplanationFolder:
    """Made on the first write; `remove()` deletes it with its files (the next write makes a new
    one)."""

    def __init__(self, prefix: str = FOLDER_PREFIX) -> None:
        self._prefix = prefix
        self._path: Path | None = None
        self._names = itertools.count(1)
        self._removal_registered = False

    @property
    def path(self) -> Path | None:
        return self._path

    def write(self, markdown: str) -> Path:
        path = self._folder() / f"explanation-{next(self._names)}.md"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(markdown + "\n")
        return path

    def remove(self) -> None:
        """Safe to call twice, and at interpreter exit."""
        path, self._path = self._path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _folder(self) -> Path:
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(prefix=self._prefix))
            if not self._removal_registered:
                atexit.register(self.remove)
                self._removal_registered = True
        return self._path
