"""The reliability and security suite (issue 6/6): long, marked ``reliability``, not run by default.

``.venv/bin/python -m pytest -m reliability tests/reliability -s``; sizes come from ``CLUE_REL_*``
environment variables (defaults: the issue's figures), and each test writes its counts to
``bench/results/reliability-<name>.json``.
"""
