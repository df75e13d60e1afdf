"""The benchmarks' floor (bench/run.py, bench/docker_noop.py): one operation that changes nothing."""

from pyinfra.operations import server

server.shell(name="Do nothing", commands=["true"])
