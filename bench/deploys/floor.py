"""The floor of bench/docker_noop.py: one operation that changes nothing on the host."""

from pyinfra.operations import server

server.shell(name="Do nothing", commands=["true"])
