"""Benchmarks that print ratios; run them with `./run bench [module]`, e.g. ``./run bench docker_noop``."""
