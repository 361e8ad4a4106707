"""Memory and throughput benchmarks of leanmerge (`python -m bench`), results as JSON + PNG + text.

Deliberately imports nothing: `python -m bench.measure` runs as a lean launcher between the
runner and every measured merge, and a package import of torch here would inflate it.
"""
