"""A throwaway deploy whose only operation fails on every host."""

from pyinfra.operations import server

server.shell(
    name="Fail on purpose",
    commands=["exit 7"],
)
