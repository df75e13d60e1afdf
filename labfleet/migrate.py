"""Replacing a PC: the new PC pulls each jupyter user's workspace and home from the old one, peer to peer.

``migrate_from = "pc03.lab"`` on the new PC. For every jupyter user that both PCs have, the new
PC pulls the user's workspace and home (the old PC's own workspace_dir and home_dir) straight
from the old PC with rsync, over the same narrow trust as ``host:`` datasets (labfleet.dataset_pull):
a key per user and directory made on the new PC, accepted by the old PC's sync account only from
the new PC's address and only for a read-only rrsync of that one directory. The files never pass
through the controller. The sync account cannot read a user's files, so the forced command runs
rrsync as the files' owner through sudo, and /etc/sudoers.d/labfleet-migrate allows exactly
those commands and nothing else (labfleet.migrate_sudo).

- Ownership is mapped by name: everything arrives owned by the user's account on the new PC
  (``--chown``), whatever the two UIDs are.
- Nothing is deleted (no ``--delete``), and a file that is newer on the new PC is kept
  (``--update``). rsync writes each file under a temporary name and renames it when complete.
- A dry run decides (``MigrationPending``): only a pull with something to move runs. That dry
  run walks the old PC's tree and sends its file list; it moves no data.
- Until the cut-over, JupyterLab of a migrating user does not start on the new PC, so the
  researcher keeps working on the old one and nothing on the new PC is newer by accident.

``migrate_final = True`` is the cut-over, in this order in one run: the old PC stops the user's
container (``docker stop``: stopped, not removed; a pending update timer is disarmed) and
writes ``/opt/labfleet/<user>/migrated-to`` there; the new PC pulls what changed since and
writes ``/var/lib/labfleet/migrate/<user>``, holding the old PC's name; then JupyterLab comes up on
the new PC. A container that is busy (kernels, terminals, GPU work: labfleet.updates' check) is
not stopped: the cut-over of that user waits, and the new PC fails with the reasons, unless the
run forces it with ``jupyter_update = "now"``. After the final pass, runs read nothing from
the old PC: a file the researcher deletes on the new PC does not come back.

On the old PC, a project with a marker (or one that a final migration takes away in this run)
is never started again by a deploy, and the status shows it as "migrated to <new PC>". Removing
the user, or the old PC, from the inventory is the admin's step; deleting the marker gives the
project back to the old PC.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from labfleet import (
    apt,
    compose,
    dataset_pull,
    dataset_rsync,
    dataset_state,
    image,
    migrate_sudo,
    planning,
    preflight,
    snapshot_files,
    updates,
)
from labfleet.facts.jupyter import ComposeService
from labfleet.facts.migrate import MarkerFact, MigrationPending, PendingPull
from labfleet.facts.system import PathState, PathStates, PublicKeyFile, path_is
from labfleet.facts.updates import ContainerBusy
from labfleet.planning import FactBatch, Parts, Read, notice, step, unless_current
from labfleet.platform import RRSYNC
from labfleet.settings import JupyterUser, Settings, for_host

# In each project directory of the old PC, written at the cut-over: "<new host> at <UTC time>".
MARKER = "migrated-to"
# The new PC's keys (one per user and directory) and the old PCs' host keys.
KEY_DIR = f"{dataset_pull.PULL_DIR}/migrate"
KNOWN_HOSTS = f"{KEY_DIR}/known_hosts"
# On the new PC, per user, once the final pass is done: the old PC's name.
STATE_DIR = "/var/lib/labfleet/migrate"
KINDS = ("workspace", "home")
# A server's per-process files (its URL and token): they describe the old PC's server.
EXCLUDES = {"home": ("/.local/share/jupyter/runtime/",)}
FORCE_HINT = updates.FORCE_HINT


@dataclass(frozen=True)
class Pull:
    """One directory of one user, pulled by the new PC (puller) from the old one."""

    puller: str
    old: str
    user: str
    kind: str  # "workspace" or "home"
    source: str  # the directory on the old PC
    dest: str  # the directory on the new PC

    @property
    def key(self) -> str:
        return f"{KEY_DIR}/id_{self.user}_{self.kind}"

    @property
    def comment(self) -> str:
        # The datasets' tag: both kinds of lines live in one authorized_keys, and each keeps
        # the other's. "/" is never in a dataset name, so the tags cannot meet.
        return f"{dataset_pull.KEY_TAG}:migrate/{self.user}/{self.kind}@{self.puller}"

    @property
    def label(self) -> str:
        return f"{self.user}'s {self.kind} {self.old}:{self.source}"


def marker_path(user: str) -> str:
    return posixpath.join(compose.project_directory(user), MARKER)


def stamp_path(user: str) -> str:
    return posixpath.join(STATE_DIR, user)


def _all_settings() -> dict[str, Settings]:
    return {other.name: for_host(other) for other in host.inventory}


def _paths(user: JupyterUser, kind: str) -> str:
    return user.workspace_dir if kind == "workspace" else user.home_dir


def pulls(settings: Settings, all_settings: dict[str, Settings]) -> list[Pull]:
    """What this host pulls: each directory of each jupyter user that the old PC has too."""
    if settings.migrate_from is None or settings.migrate_from not in all_settings:
        return []
    old = all_settings[settings.migrate_from]
    theirs = {user.name: user for user in old.jupyter_users}
    out = []
    for user in settings.jupyter_users:
        if user.name in theirs:
            for kind in KINDS:
                source, dest = _paths(theirs[user.name], kind), _paths(user, kind)
                out.append(Pull(settings.host, old.host, user.name, kind, source, dest))
    return out


def served(settings: Settings, all_settings: dict[str, Settings]) -> list[Pull]:
    """What other hosts pull from this one."""
    return [
        pull
        for name in sorted(all_settings)
        if all_settings[name].migrate_from == settings.host
        for pull in pulls(all_settings[name], all_settings)
    ]


def leaving(settings: Settings, all_settings: dict[str, Settings]) -> dict[str, str]:
    """user -> the new PC, for this host's users that a final migration takes away."""
    out = {}
    for name in sorted(all_settings):
        other = all_settings[name]
        if other.migrate_from == settings.host and other.migrate_final:
            for pull in pulls(other, all_settings):
                out[pull.user] = other.host
    return out


def rsync_flags(pull: Pull) -> list[str]:
    """rsync options of a pull.

    --chown (pull_command) maps every file to the user's account here, by name; --update keeps a file that is
    newer here; no --delete. Directory times are not copied, so the new PC's own changes to a
    directory never make the next run "fix" it. Modes, symlinks and file times are kept.
    """
    flags = [
        "--recursive",
        "--links",
        "--perms",
        "--times",
        "--omit-dir-times",
        "--update",
        "--itemize-changes",
    ]
    return flags + [f"--exclude={pattern}" for pattern in EXCLUDES.get(pull.kind, ())]


def pull_command(pull: Pull, all_settings: dict[str, Settings]) -> str:
    """The new PC's rsync command line. The group is the account's primary group, looked up by
    name on the new PC when the command runs (``id -gn``), like the owner."""
    command = dataset_pull.pull_command(
        all_settings[pull.old], pull.source, pull.dest, pull.key, KNOWN_HOSTS, rsync_flags(pull)
    )
    user = shlex.quote(pull.user)
    return command.replace("rsync ", f'rsync --chown={user}:"$(id -gn {user})" ', 1)


# --- What the step reads --------------------------------------------------------------------


def marker_read(settings: Settings) -> Read:
    """This host's cut-over markers, by user (the status reads them too)."""
    markers = tuple((user.name, marker_path(user.name)) for user in settings.jupyter_users)
    return Read(MarkerFact, {"markers": markers})


def reads(settings: Settings) -> dict[str, Read]:
    """What the step decides from: markers here; on a new PC its keys and a dry run per pull;
    on an old PC its sudoers rules and authorized keys."""
    found: dict[str, Read] = {"markers": marker_read(settings)}
    all_settings = _all_settings()
    mine = pulls(settings, all_settings)
    serving = served(settings, all_settings)
    # The sudo rules are looked for everywhere: once no host migrates from here, they go.
    paths = [migrate_sudo.SUDOERS]
    if mine:
        paths += [KNOWN_HOSTS, *(f"{pull.key}.pub" for pull in mine)]
        found["packages"] = dataset_state.reads(settings)["packages"]
        old_failed = _failed(mine[0].old)
        for pull in mine:
            # An old PC that failed to connect is not asked: only the stamp is read.
            command = "false" if old_failed else pull_command(pull, all_settings)
            found[f"pending {pull.user} {pull.kind}"] = Read(
                MigrationPending, {"command": command, "stamp": stamp_path(pull.user), "old": pull.old}
            )
    if serving:
        found["authorized"] = Read(FileContents, {"path": dataset_pull.AUTHORIZED_KEYS})
    found["paths"] = Read(PathStates, {"paths": tuple(paths), "digests": (migrate_sudo.SUDOERS,)})
    return found


def held_back(settings: Settings) -> dict[str, str]:
    """user -> why the deploy does not start that user's JupyterLab on this host.

    On an old PC: the project moved (a marker), or moves in this run (a final migration names
    it), so starting it again would leave the researcher two live copies. On a new PC before
    the cut-over: the researcher still works on the old one.
    """
    out = {}
    markers = planning.read({"markers": marker_read(settings)})["markers"]
    for user, target in markers.items():
        if target:
            out[user] = f"JupyterLab of {user} moved to {target}: its container here stays stopped"
    for user, target in leaving(settings, _all_settings()).items():
        out.setdefault(user, f"JupyterLab of {user} moves to {target} in this run: its container here is stopped")
    if settings.migrate_from and not settings.migrate_final:
        for pull in pulls(settings, _all_settings()):
            out.setdefault(
                pull.user,
                f"JupyterLab of {pull.user} starts here at the cut-over from {pull.old} "
                "(migrate_final = True); until then it runs there",
            )
    return out


def moves(settings: Settings, markers: dict[str, str | None]) -> dict[str, str]:
    """user -> what the status shows instead of a container: where it moved, or from where it comes."""
    out = {user: f"migrated to {target}" for user, target in markers.items() if target}
    if settings.migrate_from and not settings.migrate_final:
        for pull in pulls(settings, _all_settings()):
            out.setdefault(pull.user, f"moves here from {pull.old} at the cut-over (migrate_final)")
    return out


# --- Operations -------------------------------------------------------------------------------


def _failed(name: str) -> bool:
    """The host failed in this run (pyinfra counts a host it could not connect to as failed)."""
    return host.inventory.get_host(name) in host.state.failed_hosts


@operation(is_idempotent=True)
def stop_for_cut_over(user: str, target: str, force: bool, idle_seconds: int, image: str):
    """Stop a user's JupyterLab here, the old PC, for the cut-over to target, and mark the project as moved.

    + user: the jupyter user
    + target: the new PC (the marker names it)
    + force: stop it even while kernels, terminals or GPU processes are busy
    + idle_seconds: the idle window of the busy check
    + image: the project's image tag (to read its container)

    The container is stopped, not removed, and its files stay; its update timer is disarmed,
    so nothing starts it again. A busy container is left running: the cut-over waits (the new
    PC fails and says why), unless forced.
    """
    project = compose.project_name(user)
    container = compose.container_name(project)
    marker = marker_path(user)
    if host.get_fact(MarkerFact, markers=((user, marker),)).get(user) == target:
        host.noop(f"JupyterLab of {user} already moved to {target}")
        return
    if _failed(target):
        # The new PC would not pull nor start JupyterLab: stopping here would leave the researcher none.
        line = f"the cut-over of {user} to {target} waits: {target} failed earlier in this run"
        if host.state.is_executing:
            logger.warning(f"{host.print_prefix}{line}")
        host.noop(line)
        return
    state = host.get_fact(ComposeService, project=project, image=image)
    if state["status"] == "running" and not force:
        busy = host.get_fact(ContainerBusy, container=container, idle_seconds=idle_seconds)
        if busy["busy"] or not busy["checked"]:
            reasons = busy["reasons"] or ["the busy check is not installed here yet"]
            line = f"the cut-over of {user} to {target} waits: {'; '.join(reasons)}"
            if host.state.is_executing:
                logger.warning(f"{host.print_prefix}{line}")
            host.noop(line)
            return
    if state["status"] is not None:
        yield f"docker stop {shlex.quote(container)} >/dev/null"
    yield f"systemctl disable --now {shlex.quote(updates.timer_name(user))} 2>/dev/null || true"
    yield (
        f"install -d -m 0755 {shlex.quote(posixpath.dirname(marker))} && "
        f'echo {shlex.quote(target)} at "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > {shlex.quote(marker)}'
    )


def cut_over_refusal(new: str, user: str, old: str, marker: str | None, busy_reasons: list[str]) -> str:
    """The line a new PC fails with when the old PC did not hand a user over in this run."""
    if marker and marker != new:
        why = f"{old} marks that project as moved to {marker}"
        then = f"set migrate_from on {marker} instead, or delete /opt/labfleet/{user}/{MARKER} on {old}"
    else:
        why = f"its JupyterLab there is busy ({'; '.join(busy_reasons)})" if busy_reasons else "it was not stopped"
        then = f"run again once it is idle, or stop it now with {FORCE_HINT}"
    return (
        f"host {new}: the cut-over of {user} from {old} did not happen: {why}; nothing was moved, "
        f"and JupyterLab of {user} stays on {old}; {then}"
    )


def pull_failure(new: str, pull: Pull, rc: int, errors: list[str]) -> str:
    return (
        f"host {new}: cannot pull {pull.label} (rsync exit {rc}): {dataset_rsync.one_line(errors)}; "
        f"check that {pull.old} is up and that {new} reaches it (lan_address / lan_ssh_port of {pull.old}), "
        "then run again: what arrived is whole and is not sent twice"
    )


@operation(is_idempotent=True)
def pull_user_files_from(
    old: str,
    user: str,
    pulls: list[tuple[str, str, str, str]],
    stamp: str,
    final: bool,
    done: bool,
    image: str,
    idle_seconds: int,
):
    """Pull a user's workspace and home from the old PC, each only if the dry run lists something.

    + old: the old PC
    + user: the jupyter user
    + pulls: (kind, directory on the old PC, rsync command line, directory here) of each directory
    + stamp: written after the final pass, with the old PC's name; then nothing is read from it again
    + final: the cut-over: the old PC must have stopped the user's JupyterLab in this run (its marker)
    + done: the final pass was done before this run (the stamp names the old PC): nothing to read
    + image: the project's image tag on the old PC (to say why a cut-over waits)
    + idle_seconds: the old PC's idle window (idem)
    """
    if done:
        host.noop(f"{user}'s files came from {old} in the final pass already")
        return
    if _failed(old):
        yield preflight.failing_command(
            f"host {host.name}: cannot migrate {user} from {old}: {old} failed earlier in this run "
            f"(its error is above); fix what stopped it and run again"
        )
        return
    pending = {kind: host.get_fact(MigrationPending, command=cmd, stamp=stamp, old=old) for kind, _, cmd, _ in pulls}
    if final:
        peer = host.inventory.get_host(old)
        marker = peer.get_fact(MarkerFact, markers=((user, marker_path(user)),)).get(user)
        if marker != host.name:
            project = compose.project_name(user)
            reasons: list[str] = []
            running = (
                marker is None
                and host.state.is_executing
                and peer.get_fact(ComposeService, project=project, image=image)
            )
            if running and running["status"] == "running":
                busy = peer.get_fact(
                    ContainerBusy, container=compose.container_name(project), idle_seconds=idle_seconds
                )
                reasons = busy["reasons"] or ["the busy check is not installed there yet"]
            yield preflight.failing_command(cut_over_refusal(host.name, user, old, marker, reasons))
            return
    moved = False
    for kind, source, command, dest in pulls:
        found = pending[kind]
        if found["rc"] != 0:
            pull = Pull(host.name, old, user, kind, source, dest)
            yield preflight.failing_command(pull_failure(host.name, pull, found["rc"], found["errors"]))
            return
        if found["changes"]:
            moved = True
            yield command
    if final:
        yield snapshot_files.note_command(stamp, f"{old}\n")
    elif not moved:
        host.noop(f"{user}'s workspace and home already have everything from {old}")


# --- The step ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrateState:
    markers: dict[str, str | None]
    paths: dict[str, PathState]
    pending: dict[tuple[str, str], PendingPull]
    authorized: list[str]
    packages: dict


def _state(settings: Settings) -> MigrateState:
    found = planning.read(reads(settings))
    pending = {}
    for name, value in found.items():
        if name.startswith("pending "):
            _, user, kind = name.split(" ")
            pending[(user, kind)] = value
    return MigrateState(
        markers=found["markers"],
        paths=found["paths"],
        pending=pending,
        authorized=found.get("authorized") or [],
        packages=found.get("packages", {}),
    )


def _puller_keys(puller: str, keys: list[str]) -> list[str | None]:
    """The public keys a new PC holds (read from it while this old PC plans), None where unreadable."""
    if _failed(puller):
        return [None] * len(keys)
    other = host.inventory.get_host(puller)
    parts = Parts((PublicKeyFile, {"path": f"{key}.pub"}) for key in keys)
    return list(other.get_fact(FactBatch, parts=parts))


def _authorized_current(state: MigrateState, serving: list[Pull], all_settings: dict[str, Settings]) -> bool:
    """Each puller's key has its line, with the forced command it needs (an unreadable puller keeps its own)."""
    by_puller: dict[str, list[Pull]] = {}
    for pull in serving:
        by_puller.setdefault(pull.puller, []).append(pull)
    lines = set(state.authorized)
    for puller, all_its in by_puller.items():
        # Once a user is handed over (the marker here names the puller), the line is not needed.
        its = [pull for pull in all_its if state.markers.get(pull.user) != puller]
        if not its:
            continue
        address = dataset_pull._source_address(all_settings[puller])
        for pull, key in zip(its, _puller_keys(puller, [p.key for p in its]), strict=True):
            if key is None:
                continue
            wanted = dataset_pull.authorized_key_line(key, pull.source, address, RRSYNC["path"], pull.user)
            if wanted not in lines:
                return False
    return True


@operation(is_idempotent=True)
def wait_for_peers(phase: str):
    """Nothing: planned on every host of a migration at the same line, this one operation is a
    barrier in pyinfra's order (an operation waits for the operations before it on every host
    that has it), so the old and the new PC's steps run in the order the migration needs.

    + phase: what the hosts have done when they reach it
    """
    host.noop(phase)
    return
    yield  # an operation is a generator, even one that yields nothing


@step("Migrate users' files from the old PC")
def pull_user_files(settings: Settings):
    all_settings = _all_settings()
    state = _state(settings)
    mine = pulls(settings, all_settings)
    serving = served(settings, all_settings)
    if not serving and migrate_sudo.SUDOERS in state.paths:
        files.file(name="Remove the migration sudo rules", path=migrate_sudo.SUDOERS, present=False)
    if not (mine or serving):
        return
    old = all_settings[mine[0].old] if mine else None
    done = bool(mine) and all(state.pending[(p.user, p.kind)]["done"] for p in mine)
    old_failed = old is not None and _failed(old.host)

    # 1. The new PC: rsync, its keys and the old PC's host key; the old PC: its sudo rules.
    if mine and not done and not old_failed:
        assert old is not None
        tools = ["rsync", "openssh-client"]
        unless_current(
            apt.ensure_packages,
            current=not apt.missing_packages(tools, state.packages),
            name="Install the migration tools",
            packages=tools,
        )
        unless_current(
            dataset_pull.ensure_pull_keys,
            current=all(f"{pull.key}.pub" in state.paths for pull in mine),
            name="Make the keys that pull users' files from the old PC",
            keys=[(pull.key, pull.comment) for pull in mine],
        )
        reachable = all(state.pending[(p.user, p.kind)]["rc"] == 0 for p in mine)
        unless_current(
            dataset_pull.trust_peer_host_keys,
            current=KNOWN_HOSTS in state.paths and reachable,
            name="Trust the host key of the old PC",
            path=KNOWN_HOSTS,
            peers=[(old.host, old.lan_address, old.lan_ssh_port)],
        )
    if serving:
        unplain = migrate_sudo.unplain_paths(serving)
        preflight.require(
            name="Check the paths peers migrate from",
            ok=not unplain,
            problem=migrate_sudo.unplain_problem(settings.host, unplain),
        )
        text = migrate_sudo.sudoers_text(serving)
        unless_current(
            migrate_sudo.sudoers_file,
            current=path_is(
                state.paths, migrate_sudo.SUDOERS, "file", "root", "root", "440", snapshot_files.text_sha1(text)
            ),
            name="Let peers read migrating users' files, read-only",
            path=migrate_sudo.SUDOERS,
            text=text,
        )
    notice(wait_for_peers, name="Wait for the other PC of the migration", phase="keys made, sudo rules written")

    # 2. The old PC: the new PCs' keys, then the cut-over (each container stopped and marked).
    if serving:
        unless_current(
            dataset_pull.authorize_pullers,
            current=_authorized_current(state, serving, all_settings),
            name="Let the new PCs pull users' files from this host, read-only",
            path=dataset_pull.AUTHORIZED_KEYS,
            pullers=[
                (p.puller, p.key, p.source, dataset_pull._source_address(all_settings[p.puller]), p.user)
                for p in serving
            ],
        )
    tag = image.image_tag(settings)
    for user, target in sorted(leaving(settings, all_settings).items()):
        unless_current(
            stop_for_cut_over,
            current=state.markers.get(user) == target,
            name=f"Stop JupyterLab of {user} for the cut-over",
            user=user,
            target=target,
            force=all_settings[target].jupyter_update == "now",
            idle_seconds=settings.jupyter_update_idle,
            image=tag,
        )
    notice(wait_for_peers, name="Wait for the old PC to serve the migration", phase="keys accepted, cut-over done")

    # 3. The new PC pulls what changed.
    for user in sorted({pull.user for pull in mine}):
        assert old is not None
        its = [pull for pull in mine if pull.user == user]
        pending = [state.pending[(p.user, p.kind)] for p in its]
        if settings.migrate_final:
            current = all(found["done"] for found in pending)
        else:
            current = all(found["done"] or (found["rc"] == 0 and not found["changes"]) for found in pending)
        unless_current(
            pull_user_files_from,
            current=current,
            name=f"Pull the workspace and home of {user} from the old PC",
            old=old.host,
            user=user,
            pulls=[(p.kind, p.source, pull_command(p, all_settings), p.dest) for p in its],
            stamp=stamp_path(user),
            final=settings.migrate_final,
            done=all(found["done"] for found in pending),
            image=image.image_tag(old),
            idle_seconds=old.jupyter_update_idle,
        )
