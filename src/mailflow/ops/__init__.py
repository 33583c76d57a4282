"""Operator work on the ledger and the stored mail: reconcile, archive, retry, redrive, status."""
