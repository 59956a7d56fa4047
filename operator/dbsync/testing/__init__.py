"""Test doubles and throwaway servers for dbsync's own tests, demo and benchmarks.

Nothing here is used by the operator or the CLI in production.
"""
