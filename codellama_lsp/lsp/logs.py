"""Logging to stderr (and a file): one line per request, no document text above debug.

pygls logs whole messages (document text included) at info and its errors with the request's
parameters; below debug those records keep only their message template.
"""

from __future__ import annotations

import logging
import sys

from codellama_lsp.config import ServerConfig

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactLibraryRecords(logging.Filter):
    """Strip the arguments (message bodies, parameters) from library records."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug or record.name.startswith("codellama_lsp"):
            return True
        if record.args:
            record.msg = f"{record.msg} [details at log level debug]"
            record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


def setup_logging(settings: ServerConfig) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    debug = level <= logging.DEBUG
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        try:
            handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
        except OSError as exc:
            print(f"codellama-lsp: cannot log to {settings.log_file}: {exc}", file=sys.stderr)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(RedactLibraryRecords(debug))
        root.addHandler(handler)
    root.setLevel(level)
    # pygls narrates every message at info; only its warnings matter unless debugging.
    logging.getLogger("pygls").setLevel(level if debug else logging.WARNING)
