"""A host's command, wrapped so that every run of it is logged: what a no-change deploy ran.

rsync = CommandLog("rsync")
host_exec(host, rsync.install)    # once per host; again only empties the log
... deploy ...
assert rsync.calls(host) == []    # the command lines since the last call (the log is emptied)
"""

from __future__ import annotations

from dataclasses import dataclass

from .hosts import TestHost, host_exec


@dataclass(frozen=True)
class CommandLog:
    """/usr/bin/<command> replaced by a shell script that logs its arguments, then execs the real one."""

    command: str

    @property
    def log(self) -> str:
        return f"/var/log/labfleet-test-{self.command}.log"

    @property
    def install(self) -> str:
        """Shell that installs the wrapper, once however often it runs (a second mv would make the
        wrapper exec itself), and empties the log. A line is the arguments after one space."""
        real, wrapper = f"/usr/bin/{self.command}.real", f"/usr/bin/{self.command}"
        return (
            f"{{ test -e {real} || {{ mv {wrapper} {real} && printf '%s\\n' '#!/bin/sh' "
            f"'echo \" $*\" >> {self.log}' 'exec {real} \"$@\"' > {wrapper} && chmod 755 {wrapper}; }}; }} "
            f"&& : > {self.log}"
        )

    def calls(self, host: TestHost) -> list[str]:
        """The command lines the host ran since the last call (the log is emptied)."""
        return host_exec(host, f"cat {self.log}; : > {self.log}").stdout.splitlines()
