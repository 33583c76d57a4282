"""structlog setup: JSON lines when not on a TTY (CloudWatch, docker logs), console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _drop_emf(
    _logger: object,
    _name: str,
    event: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    """EMF metrics are for CloudWatch; on a terminal they only bury the outcome."""
    event.pop("_aws", None)
    return event


def configure(
    log_format: Literal["json", "console", "auto"] = "auto",
    level: str = "info",
) -> None:
    """Configure structlog for the process: logs go to stderr, as JSON lines (`json`, or `auto`
    off a terminal) or for people (`console`), at `level` (unknown names mean info).
    Library logging (botocore, aiohttp) is kept to warnings."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *([] if as_json else [_drop_emf]),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # botocore and aiohttp talk through stdlib logging; keep them to warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
