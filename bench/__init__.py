"""Benchmarks that print ratios; run them as modules, e.g. ``python -m bench.docker_noop``."""
