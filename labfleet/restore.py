"""Restoring each jupyter user's workspace and home from the lab's backup onto a new PC (``restore_from``).

With ``restore_from = "backup"`` (this host's own snapshots) or ``"backup:pc03.lab"`` (another
host's, a dead PC's), each user's newest workspace and home snapshots in ``backup_repository``
(labfleet.backup) are restored before JupyterLab comes up: into a staging directory beside the
target, given to the user by name (restic restores the old numeric ids, which may belong to
someone else on this PC), then copied in without replacing, or writing through, anything that
was already there. A marker per user and directory makes it happen once.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import operation

from labfleet import jupyter, preflight, snapshot_files
from labfleet.facts.backup import RESTIC, STATE_DIR, ResticSnapshots, latest
from labfleet.facts.system import PathState, PathStates, path_is
from labfleet.planning import Read, snapshot, step, unless_current
from labfleet.settings import Settings

KINDS = ("workspace", "home")


def restored_marker(user: str, kind: str) -> str:
    return f"{STATE_DIR}/restored-{user}-{kind}"


def kept_list(marker: str) -> str:
    """While a restore is under way: what its target held before (restore_command)."""
    return f"{marker}.kept"


def restore_source(settings: Settings) -> str | None:
    """The host whose snapshots restore_from names (this host for "backup")."""
    if settings.restore_from is None:
        return None
    return settings.host if settings.restore_from == "backup" else settings.restore_from.partition(":")[2]


def restore_text(settings: Settings) -> str:
    """What a restored marker holds: the restore_from it restored (changing it restores again, never over files)."""
    return f"{settings.restore_from}\n"


def reads(settings: Settings) -> dict[str, Read]:
    """The markers of the restores done (none to read without restore_from)."""
    if settings.restore_from is None:
        return {}
    markers = tuple(restored_marker(user.name, kind) for user in settings.jupyter_users for kind in KINDS)
    return {"paths": Read(PathStates, {"paths": markers, "digests": markers})}


@dataclass(frozen=True)
class RestoreState:
    paths: dict[str, PathState] | None = None


# --- Operations ---------------------------------------------------------------------------------


@operation(is_idempotent=True)
def restore_directory(source: str, user: str, group: str, kind: str, target: str, marker: str, marker_text: str):
    """Restore a user's newest snapshot of one directory into it, never over a file that is there, once.

    + source: the host whose snapshots are read (restic ``--host``)
    + user: the jupyter user (``user:<name>`` tag); the restored files become this account's, by name
    + group: the account's group
    + kind: ``workspace`` or ``home`` (``kind:<kind>`` tag)
    + target: the directory restored into
    + marker: the file that says the restore was done
    + marker_text: what the marker holds (the restore_from it did)

    **Example:**

    .. code:: python

        restore_directory(name="Restore the workspace of alice", source="pc03.lab", user="alice", group="alice",
                          kind="workspace", target="/srv/workspace/alice",
                          marker="/var/lib/labfleet/backup/restored-alice-workspace", marker_text="backup:pc03.lab\\n")
    """
    found = host.get_fact(ResticSnapshots, source=source)
    mark = snapshot_files.note_command(marker, marker_text)
    if found["state"] == "unavailable":
        # A preview before labfleet-restic is installed: the run reads the snapshots again.
        yield f"echo 'restore {kind} of {user} from {source}'"
        return
    if found["state"] == "error":
        yield preflight.failing_command(
            f"host {host.name}: cannot list the snapshots of {source} to restore the {kind} of {user}: "
            f"{found['error']}; fix the repository's access (see the backup step above), then run the deploy again"
        )
        return
    if not found["snapshots"]:
        yield preflight.failing_command(
            f"host {host.name}: restore_from names {source}, but the backup repository holds no labfleet snapshot "
            f"taken on {source}; check the name (restic snapshots lists the hosts) or remove restore_from"
        )
        return
    chosen = latest(found["snapshots"], user, kind)
    if chosen is None:
        message = f"no snapshot of the {kind} of {user} from {source}: nothing to restore there"
        if host.state.is_executing:
            logger.warning(f"{host.print_prefix}{message}")
        yield mark
        return
    command = restore_command(chosen["id"], chosen["paths"][0], target, user, group, kept_list(marker))
    yield f"{command} && {mark}"


def restore_command(snapshot_id: str, path: str, target: str, user: str, group: str, kept: str) -> str:
    """Restore path of a snapshot into target through a staging directory beside it, never over what was there.

    The staging directory is beside target, on its file system; the next attempt starts it
    afresh. Before the first file is copied in, ``kept`` lists what target held (once: a later
    attempt reads the same list). Those paths are taken out of the staging directory (a
    directory on both sides stays, for what is new inside it), so they are never written nor
    written through (a symlink there is not followed); the rest is copied in, directories that
    are there keeping their owner, mode and times. A file half-written by an interrupted attempt
    is not in the list, so the next attempt writes it whole; the marker comes only after the copy.
    """
    staging = posixpath.join(posixpath.dirname(target), f".labfleet-restore-{posixpath.basename(target)}")
    source = staging + path
    q_staging, q_target, q_source, q_kept = (shlex.quote(p) for p in (staging, target, source, kept))
    script = (
        f"set -eo pipefail; rm -rf {q_staging}; install -d -m 0700 {q_staging}; "
        f"{shlex.quote(RESTIC)} restore --retry-lock 10m {shlex.quote(snapshot_id)} --target {q_staging} >/dev/null; "
        f"chown -R -h {shlex.quote(f'{user}:{group}')} {q_staging}; "
        f"[ -d {q_target} ] || install -d -o {shlex.quote(user)} -g {shlex.quote(group)} {q_target}; "
        f"if [ ! -e {q_kept} ]; then install -d -m 0755 {shlex.quote(posixpath.dirname(kept))}; "
        f"(cd {q_target} && find . -mindepth 1 -print0) > {q_kept}.new; mv {q_kept}.new {q_kept}; fi; "
        # find lists a directory before what it holds: a path's parents are dealt with first.
        f"cd {q_source}; while IFS= read -r -d '' p; do "
        f'if [ -d {q_target}/"$p" ] && [ ! -L {q_target}/"$p" ] && [ -d "$p" ] && [ ! -L "$p" ]; then continue; fi; '
        f'rm -rf -- "$p"; done < {q_kept}; cd /; '
        f"tar -C {q_source} -cf - . | tar -C {q_target} -xpf - --no-overwrite-dir; "
        f"rm -rf {q_staging}; rm -f {q_kept}"
    )
    return f"bash -c {shlex.quote(script)}"


# --- The step -----------------------------------------------------------------------------------


@step("Restore the workspaces and homes from the backup")
def restore_workspaces(settings: Settings):
    source = restore_source(settings)
    if source is None:
        return
    paths = snapshot(RestoreState, reads(settings)).paths or {}
    text = restore_text(settings)
    for project in jupyter.projects(settings):
        user = project.user
        for kind, target in (("workspace", user.workspace_dir), ("home", user.home_dir)):
            marker = restored_marker(user.name, kind)
            unless_current(
                restore_directory,
                current=path_is(paths, marker, "file", sha1=snapshot_files.text_sha1(text)),
                name=f"Restore the {kind} of {user.name} from {settings.restore_from}",
                source=source,
                user=user.name,
                group=project.group,
                kind=kind,
                target=target,
                marker=marker,
                marker_text=text,
            )
