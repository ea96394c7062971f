"""Structured logging: JSON lines in production, readable console lines in development.

Context such as `device_id` or `request_id` is bound per unit of work with
`structlog.contextvars.bind_contextvars`, so every line logged while handling it carries it.

The level can change while the process runs (`set_level`: a device's configuration sets it).
structlog caches loggers on first use, so the level is not baked into the cached loggers: the
first processor drops what is below the current level.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog
from structlog.processors import NAME_TO_LEVEL

LogFormat = Literal["json", "console"]

_threshold = [logging.INFO]  # the current level; a list so set_level can change it in place


def _below_threshold(_logger: object, method_name: str, event_dict: structlog.types.EventDict) -> Any:
    if NAME_TO_LEVEL.get(method_name, logging.CRITICAL) < _threshold[0]:
        raise structlog.DropEvent
    return event_dict


def configure(level: str = "INFO", fmt: LogFormat = "console") -> None:
    """Route structlog and the standard library's logging through one renderer on stderr."""
    set_level(level)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[_below_threshold, *shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # No level baked in: _below_threshold filters, so set_level reaches cached loggers too.
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Third-party chatter that drowns our lines at INFO.
    for noisy in ("httpx", "httpcore", "uvicorn.access", "aiosqlite", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level of every logger of the process, at once (DEBUG, INFO, WARNING, ERROR)."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")  # noqa: TRY004 - a bad value, not a bad type
    _threshold[0] = number
    logging.getLogger().setLevel(number)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger for a module."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
