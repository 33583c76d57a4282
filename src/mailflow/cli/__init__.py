"""The `mailflow` command: argument parsing and dispatch (`app`), operator commands (`ops`,
`browse`) and the one rendering module (`render`)."""

from mailflow.cli.app import main

__all__ = ["main"]
