"""A throwaway deploy whose shell operation reports a change on every run."""

from pyinfra.operations import server

server.shell(
    name="Touch the harness stamp",
    commands=["touch /tmp/labfleet-harness-stamp"],
)
