"""Operator subcommands beyond the worker's own: registered into the main parser."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the operator commands to `mailflow`'s subparsers."""
    _ = (sub, argparse)
