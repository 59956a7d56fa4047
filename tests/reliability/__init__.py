"""Reliability scenarios: process, operator and database faults, concurrency and figures."""
