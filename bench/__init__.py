"""Benchmarks: each prints ratios against a baseline measured in the same process and run.

Run one with ``python -m bench.<name> [--quick]``, all with ``python -m bench.run_all [--quick]``;
results land in ``bench/results/<name>.json``.
"""
