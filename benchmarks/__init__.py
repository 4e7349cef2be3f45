"""Benchmarks and checks run from a checkout, not shipped with kdlib (the package lists ``kdlib*`` only).

``python benchmarks/bench.py``: kdlib's training step against the original study's method
(``reference.py``), the divergences alone (``divergence.py``), data preparation (``prep.py``), merged
and rendered by ``report.py``. Results and the commands that made them: docs/benchmarks.md.
"""
