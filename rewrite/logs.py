"""The ``rewrite`` logger, wired into torch's logging: ``TORCH_LOGS="+rewrite"`` (DEBUG),
``TORCH_LOGS="rewrite"`` (INFO) or ``torch._logging.set_logs(rewrite=logging.DEBUG)``; and, without
torch's machinery, ``REWRITE_LOG=debug|info`` (a stderr handler at that level)."""

from __future__ import annotations

import logging
import os

import torch._logging._internal as torch_logging

log = logging.getLogger("rewrite")


def register() -> None:
    """Register the logger with torch._logging, then re-read TORCH_LOGS (torch parsed it at import,
    before the name existed) and REWRITE_LOG."""
    torch_logging.register_log("rewrite", "rewrite")
    level = os.environ.get("REWRITE_LOG", "").upper()
    if level in ("DEBUG", "INFO", "WARNING"):
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[rewrite] %(levelname)s %(message)s"))
            log.addHandler(handler)
        log.setLevel(level)
