"""Test support code: importable helpers, shared by tests in every folder."""
