"""Tests of protocol/ and agent/ that run on every Python the agent supports (>= 3.6).

They use only the standard library (no pytest features), so `tests/compat/run.py` can run
them under old interpreters; pytest collects them too.
"""
