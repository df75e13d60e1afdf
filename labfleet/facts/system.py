"""Facts about accounts, paths, groups, services and disks: read by every step."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase


class HomeState(TypedDict):
    kind: str  # directory, link, other or absent
    user: str
    group: str


class Account(TypedDict):
    uid: str
    gid: str
    group: str | None  # the primary group's name
    home: str
    home_state: HomeState


class PathState(TypedDict):
    kind: str  # file, directory, link or other
    user: str
    group: str
    mode: str  # as `stat -c %a` prints it: "2755"
    sha1: str | None


class UnitState(TypedDict):
    systemd: bool
    active: str | None
    enabled: str | None


class Accounts(FactBase[dict[str, Account]]):
    """Some host accounts and their home directories, from ``getent``.

    + names: the account names to look up

    Returns ``{name: {"uid", "gid", "group", "home", "home_state"}}`` for the accounts that
    exist: ``group`` is the primary group's name, ``home_state`` ``{"kind", "user",
    "group"}`` (kind ``absent`` when there is no home directory). Far cheaper than pyinfra's
    ``Users`` fact, which runs several commands for every account on the host.
    """

    @staticmethod
    def default():
        return {}

    def command(self, names: tuple[str, ...]) -> str:
        if not names:
            return "true"
        quoted = " ".join(shlex.quote(name) for name in names)
        return (
            f"getent passwd {quoted} | while IFS=: read -r n _ uid gid _ home _; do "
            'g=$(getent group "$gid" | cut -d: -f1); '
            'if [ -L "$home" ]; then k="link - -"; '
            'elif [ -d "$home" ]; then k="directory $(stat -c \'%U %G\' "$home")"; '
            'elif [ -e "$home" ]; then k="other - -"; else k="absent - -"; fi; '
            'echo "account $n $uid $gid ${g:--} $k $home"; done; true'
        )

    def process(self, output):
        accounts = {}
        for line in output:
            parts = line.split(" ", 8)
            if len(parts) == 9 and parts[0] == "account":
                _, name, uid, gid, group, kind, home_user, home_group, home = parts
                accounts[name] = {
                    "uid": uid,
                    "gid": gid,
                    "group": None if group == "-" else group,
                    "home": home,
                    "home_state": {"kind": kind, "user": home_user, "group": home_group},
                }
        return accounts


# What `stat %F` prints, as PathStates names it (anything else is "other").
STAT_KINDS = {"directory": "directory", "symbolic link": "link", "regular file": "file", "regular empty file": "file"}


class PathStates(FactBase[dict[str, PathState]]):
    """Kind, owner, mode and (for some files) sha1 of several paths, in one command.

    + paths: the paths to look at
    + digests: those of the paths whose sha1 is wanted (the files labfleet uploads)

    Returns ``{path: {"kind", "user", "group", "mode", "sha1"}}`` for the paths that exist:
    kind is ``file``, ``directory``, ``link`` or ``other``; mode is what ``stat -c %a``
    prints (``"2755"``); sha1 is None unless asked for.
    """

    @staticmethod
    def default():
        return {}

    def command(self, paths: tuple[str, ...], digests: tuple[str, ...] = ()) -> str:
        # Two programs whatever the number of paths: one stat for all (a missing path is
        # left out), one sha1sum for the files asked for. User and group names hold no "/".
        if not paths:
            return "true"
        listed = " ".join(shlex.quote(path) for path in paths)
        hashed = " ".join(shlex.quote(path) for path in digests)
        return f"stat --printf 'stat %F/%U/%G/%a/%n\\n' -- {listed}; " + (
            f"sha1sum -- {hashed}; true" if hashed else "true"
        )

    def process(self, output):
        states, sums = {}, {}
        for line in output:
            if line.startswith("stat "):
                parts = line[5:].split("/", 4)
                if len(parts) == 5:
                    kind, user, group, mode, path = parts
                    kind = STAT_KINDS.get(kind, "other")
                    if kind in ("link", "other"):
                        user = group = mode = "-"
                    states[path] = {"kind": kind, "user": user, "group": group, "mode": mode, "sha1": None}
            else:
                digest, _, path = line.partition("  ")
                if len(digest) == 40 and path:
                    sums[path] = digest
        for path, state in states.items():
            if state["kind"] == "file":
                state["sha1"] = sums.get(path)
        return states


def path_is(
    states: dict,
    path: str,
    kind: str,
    user: str | None = None,
    group: str | None = None,
    mode: str | int | None = None,
    sha1: str | None = None,
) -> bool:
    """Whether a PathStates result shows path exactly as asked (None: not asked)."""
    found = states.get(path)
    if not found or found["kind"] != kind:
        return False
    if user is not None and found["user"] != user:
        return False
    if group is not None and found["group"] != group:
        return False
    if mode is not None and not (found["mode"].isdigit() and int(found["mode"], 8) == int(str(mode), 8)):
        return False
    return sha1 is None or found["sha1"] == sha1


class GroupMembers(FactBase):
    """A group and some accounts: ``{"exists": bool, "members": [...], "accounts": [...]}``.

    + group: the group name
    + users: the accounts to look up; ``accounts`` lists those that exist

    ``members`` are the group's supplementary members (``getent group``). Cheaper than
    the Users fact, which runs several commands for every account on the host.
    """

    @staticmethod
    def default():
        return {"exists": False, "members": [], "accounts": []}

    def command(self, group: str, users: tuple[str, ...] = ()) -> str:
        names = " ".join(shlex.quote(user) for user in users)
        lookup = f'for u in {names}; do getent passwd "$u" >/dev/null && echo "account $u"; done; ' if names else ""
        return f'g=$(getent group {shlex.quote(group)}) && echo "group $g"; {lookup}true'

    def process(self, output):
        found = self.default()
        for line in output:
            kind, _, value = line.partition(" ")
            if kind == "group":
                found["exists"] = True
                found["members"] = [name for name in value.split(":")[-1].split(",") if name]
            elif kind == "account":
                found["accounts"].append(value)
        return found


class ServiceState(FactBase[UnitState]):
    """A systemd unit's state: ``{"systemd": bool, "active": "active" | ..., "enabled": "enabled" | ...}``.

    One command for both states, and no error on a host without systemd (``systemd`` is
    then False), so planning works anywhere.
    """

    @staticmethod
    def default():
        return {"systemd": False, "active": None, "enabled": None}

    def command(self, service: str) -> str:
        unit = shlex.quote(service)
        # One systemctl for both: UnitFileState is what `systemctl is-enabled` prints.
        return (
            "[ -d /run/systemd/system ] || exit 0; echo systemd; "
            f"systemctl show --property=ActiveState,UnitFileState {unit} 2>/dev/null"
        )

    def process(self, output):
        state = self.default()
        keys = {"ActiveState": "active", "UnitFileState": "enabled"}
        for line in output:
            key, _, value = line.strip().partition("=")
            if key == "systemd":
                state["systemd"] = True
            elif key in keys:
                state[keys[key]] = value or None
        return state


class FreeBytes(FactBase):
    """Free bytes on the filesystem holding path (its nearest existing parent)."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f'p={quoted}; while [ ! -e "$p" ] && [ "$p" != / ]; do p=$(dirname "$p"); done; '
            "df -PB1 \"$p\" | awk 'NR==2 {print $4}'"
        )

    def process(self, output):
        return int(output[0]) if output and output[0].strip().isdigit() else None


class PublicKeyFile(FactBase):
    """The one-line OpenSSH public key in a file, or None when there is no such file."""

    def command(self, path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output):
        keys = [line.strip() for line in output if line.strip() and not line.startswith("#")]
        return keys[0] if keys else None


class PublicKeyFiles(FactBase):
    """The one-line OpenSSH public key in each of several files: ``{path: key or None}``, in one command.

    + paths: the public key files

    So that a host's keys come with its planning batch (labfleet.dataset_pull), where a
    PublicKeyFile per key would be a fact each.
    """

    MARK = "--labfleet-key-file--"

    @staticmethod
    def default():
        return {}

    def command(self, paths: tuple[str, ...]) -> str:
        shown = (f"echo {self.MARK}{shlex.quote(path)}; cat {shlex.quote(path)} 2>/dev/null" for path in paths)
        return "; ".join(shown) or "true"

    def process(self, output):
        keys: dict[str, str | None] = {}
        lines: list[str] = []
        path = None
        for line in [*output, self.MARK]:
            if self.MARK not in line:
                lines.append(line)
                continue
            # A file without a final newline shares its last line with the next mark.
            rest, _, after = line.partition(self.MARK)
            if path is not None:
                keys[path] = PublicKeyFile().process([*lines, rest])
            path, lines = after, []
        return keys


class SshHostKey(FactBase):
    """This host's SSH host public key ("type base64"), ed25519 when it has one, else None."""

    def command(self) -> str:
        return (
            "for t in ed25519 ecdsa rsa; do f=/etc/ssh/ssh_host_${t}_key.pub; "
            '[ -r "$f" ] && { cat "$f"; break; }; done; true'
        )

    def process(self, output):
        for line in output:
            parts = line.split()
            if len(parts) >= 2:
                return f"{parts[0]} {parts[1]}"
        return None
