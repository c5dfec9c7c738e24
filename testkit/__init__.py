"""Helpers that the tests and the benchmarks share (standard library only); not part of the ckptbus wheel.

Importable from the repository root: pytest puts it on the path
(``pythonpath`` in pyproject.toml), and the benchmarks run as modules from
there (``python -m benchmarks.latency``).
"""
