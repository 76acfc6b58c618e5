"""Benchmarks against the peers a user would otherwise pick; `python -m benchmarks` writes BENCHMARKS.md."""
