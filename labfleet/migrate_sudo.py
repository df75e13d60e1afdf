"""The old PC's sudo rule for a migration (labfleet.migrate): the sync account may run exactly the
forced read-only rrsync of each migrating directory, as the files' owner, and nothing else.

The sync account cannot read a user's 0700 home, so a peer's forced command is
``sudo -n -u <user> rrsync -ro <dir>``; /etc/sudoers.d/labfleet-migrate names each of those
commands, checked by ``visudo`` before it replaces the old file, and goes once no host
migrates from this one.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from pyinfra.api import operation

from labfleet import dataset_pull
from labfleet.platform import RRSYNC

if TYPE_CHECKING:
    from labfleet.migrate import Pull

SUDOERS = "/etc/sudoers.d/labfleet-migrate"
# What a sudoers rule and a forced command can hold without quoting.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]+$")


def sudoers_text(served_pulls: list[Pull]) -> str:
    """The sudoers rules that let the sync account run exactly the forced commands, as each file owner."""
    by_user: dict[str, list[str]] = {}
    for pull in served_pulls:
        command = f"{RRSYNC['path']} -ro {pull.source}"
        if command not in by_user.setdefault(pull.user, []):
            by_user[pull.user].append(command)
    lines = [
        "# Written by labfleet (labfleet/migrate_sudo.py): peers that migrate users' files read them as their owner,",
        "# through a forced read-only rrsync of one directory each; this file goes once no host migrates from here.",
        f'Defaults:{dataset_pull.SYNC_USER} env_keep += "SSH_ORIGINAL_COMMAND"',
    ]
    for user, commands in by_user.items():
        lines.append(f"{dataset_pull.SYNC_USER} ALL=({user}) NOPASSWD: {', '.join(commands)}")
    return "\n".join(lines) + "\n"


def unplain_paths(served_pulls: list[Pull]) -> list[str]:
    return sorted({pull.source for pull in served_pulls if not _PLAIN_PATH.match(pull.source)})


def unplain_problem(host_name: str, unplain: list[str]) -> str:
    return (
        f"host {host_name}: cannot serve migrations of {', '.join(unplain)}: a sudo rule cannot name such a "
        "path; use workspace_dir / home_dir made of letters, digits and . _ - @ + /"
    )


@operation(is_idempotent=True)
def sudoers_file(path: str, text: str):
    """Write a sudoers drop-in, checked by ``visudo -c`` before it replaces the old one.

    + path: the file under /etc/sudoers.d
    + text: its content

    A drop-in with a syntax error would break sudo on the host, and with it every later run.
    """
    yield (
        f'tmp=$(mktemp) && printf %s {shlex.quote(text)} > "$tmp" && visudo -cqf "$tmp" && '
        f'install -m 0440 -o root -g root "$tmp" {shlex.quote(path)}; rc=$?; rm -f "$tmp"; exit $rc'
    )
