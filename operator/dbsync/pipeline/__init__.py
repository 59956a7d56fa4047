"""The database pipeline: migrate, diff, ledger and audit, sequenced by the runner.

Nothing in this package imports Kubernetes code; the CLI and the operator both call it.
"""
