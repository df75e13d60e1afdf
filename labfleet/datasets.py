"""Datasets: one layout on every host, kept in sync with its source, never deleted.

Layout. ``datasets_root`` and every dataset directory belong to root and the datasets group
(``labdata``), setgid so that whatever is created inside keeps that group, with a default
ACL so that new files get the group's permissions whatever the creator's umask: read-only
datasets give the group r-x, ``readonly: False`` datasets give it rwx (lab members write
there). The jupyter users join the group.

Sources (``Dataset.source.kind``; each is one entry of ``SOURCE_KINDS`` and its function here):

- ``manual``: the directory only.
- ``local:<path>``: pushed from the controller with rsync, over the SSH settings pyinfra
  uses for that host. The host's record of its last verified sync, against one walk of the
  source per run, decides whether to sync at all (labfleet.dataset_records); then rsync
  moves only what differs.
- ``host:<peer>:<path>``: pulled by this host from a peer, so a large dataset crosses the
  controller's link once. The trust is narrow: each puller has its own key per dataset,
  made on the puller (the private key never leaves it), and the peer accepts that key only
  for a dedicated account without sudo, only from the puller's address, and only for a
  read-only rsync of that one path (``restrict,from=...,command="rrsync -ro <path>"``).
- ``nfs:<server>:<export>``: a read-only systemd mount unit, enabled at boot.
- ``s3:<bucket>/<prefix>``: fetched by the host with rclone (labfleet.datasets_s3), its keys
  in a root-only rclone config file.

Never delete: rsync runs without ``--delete`` unless the dataset says ``prune: True``, and
writes each file to a temporary name that it renames only when the file is complete, so a
killed transfer leaves no half-written file in place. An optional sha256 manifest is
checked after every sync that changed something; a mismatch stops that host with the list
of bad files.
"""

from __future__ import annotations

import ipaddress
import posixpath
import shlex
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FunctionCommand, operation
from pyinfra.api.exceptions import PyinfraError
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Which
from pyinfra.operations import files, server, systemd

from labfleet import (
    apt,
    dataset_changes,
    dataset_fanout,
    dataset_records,
    dataset_upstream,
    datasets_s3,
    planning,
    preflight,
)
from labfleet.facts.datasets import (
    DatasetRecords,
    DefaultAcls,
    ManifestState,
    RecordState,
    RsyncDryRun,
    SyncRecord,
    parse_rsync_itemized,
)
from labfleet.facts.system import Account, GroupMembers, PathState, PathStates, PublicKeyFile, SshHostKey, path_is
from labfleet.planning import Read, step, unless_current
from labfleet.platform import RRSYNC
from labfleet.settings import Dataset, Settings, for_host

# Default ACLs: read-only datasets never give the group write, writable ones always do.
ACL_READONLY = ("user::rwx", "group::r-x", "other::r-x")
ACL_WRITABLE = ("user::rwx", "group::rwx", "other::r-x")
# Where a host keeps the sha256 of the manifest it last verified, per dataset.
STATE_DIR = "/var/lib/labfleet/datasets"
# A puller's keys and the host keys of its peers.
PULL_DIR = "/etc/labfleet/dataset-pull"
KNOWN_HOSTS = f"{PULL_DIR}/known_hosts"
# The account a peer serves pulls from: no sudo, no password, a forced read-only rrsync per key.
SYNC_USER = "labfleet-sync"
SYNC_HOME = "/var/lib/labfleet-sync"
SYNC_SSH_DIR = f"{SYNC_HOME}/.ssh"
KEY_TAG = "labfleet-pull"
# The kinds whose hosts keep a record of their last verified sync (labfleet.dataset_records).
RECORDED = ("local", "s3", "host")
# How many local: datasets one host receives at once (their dry runs and transfers overlap);
# hosts are pushed to in parallel anyway.
PARALLEL_PUSHES = 4
# Longest chain of pulls (pc03 <- pc02 <- pc01 is 2) one run can order; see lay_out_datasets.
MAX_PULL_DEPTH = 3


def dataset_dir(settings: Settings, dataset: Dataset) -> str:
    return posixpath.join(settings.datasets_root, dataset.name)


def pulled_from(dataset: Dataset) -> tuple[str, str]:
    """(peer, path on the peer) of a host: dataset; its Source holds both for that kind."""
    peer, path = dataset.source.peer, dataset.source.path
    assert peer is not None and path is not None, dataset
    return peer, path


def stamp_path(dataset: Dataset) -> str:
    return posixpath.join(STATE_DIR, f"{dataset.name}.verified")


def one_line(lines: list[str], limit: int = 1000) -> str:
    """What rsync said, on one line (its last limit characters): an error message is one line."""
    return " ".join(line.strip() for line in lines if line.strip())[-limit:]


def rsync_flags(dataset: Dataset, group: str) -> list[str]:
    """rsync options shared by pushes and pulls.

    Owner, group and modes come from the layout, not from the source machine: a controller's
    uid means nothing on a host. Directory times are left alone, so a file a member adds to
    a writable dataset does not make the next run "fix" its directory. No --inplace and no
    --partial: rsync writes a temporary file and renames it once it is complete.
    """
    chmod = "D2755,Fu+rw,Fgo+r,Fgo-w" if dataset.readonly else "D2775,Fug+rw,Fo+r,Fo-w"
    flags = [
        "--recursive",
        "--links",
        "--times",
        "--omit-dir-times",
        "--perms",
        f"--chmod={chmod}",
        f"--chown=root:{group}",
        "--itemize-changes",
    ]
    if dataset.prune:
        flags.append("--delete")
    return flags


# --- Layout --------------------------------------------------------------------------------


@operation(is_idempotent=True)
def default_acl(path: str, entries: tuple[str, ...]):
    """Give a directory exactly these default ACL entries (what new files and directories inherit).

    + path: the directory
    + entries: getfacl-style entries without the ``default:`` prefix, e.g. ``("user::rwx", "group::rwx", "other::r-x")``

    **Example:**

    .. code:: python

        default_acl(name="Group-writable shared data", path="/srv/shared",
                    entries=("user::rwx", "group::rwx", "other::r-x"))
    """
    current = host.get_fact(DefaultAcls, paths=(path,)).get(path)
    if current is not None and set(current) == set(entries):
        host.noop(f"{path} already has default ACL {','.join(entries)}")
        return
    # --remove-default first: only the listed entries, none left from an earlier setting.
    acl = ",".join("default:" + entry for entry in entries)
    yield f"setfacl --remove-default --modify {shlex.quote(acl)} {shlex.quote(path)}"


@dataclass(frozen=True)
class DatasetsState:
    """What the datasets step decides from while planning (see ``reads``)."""

    packages: dict[str, list[str]]
    group: dict  # GroupMembers: {"exists", "members", "accounts"}
    paths: dict[str, PathState]
    acls: dict[str, tuple[str, ...]]
    accounts: dict[str, Account]
    records: dict[str, RecordState]  # DatasetRecords, of the local:, s3: and host: datasets
    pulled: dict[str, RecordState]  # DatasetRecords of the host: datasets' pulls (labfleet.dataset_fanout)


def reads(settings: Settings) -> dict[str, Read]:
    """The facts the datasets step decides from while planning, by DatasetsState's field names."""
    owned = [dataset_dir(settings, d) for d in settings.datasets if not SOURCE_KINDS[d.source.kind].mounted]
    users = {user.name for user in settings.jupyter_users}
    paths = [settings.datasets_root, *(dataset_dir(settings, d) for d in settings.datasets)]
    if serves_peers(settings.host):
        users.add(SYNC_USER)
        paths.append(SYNC_SSH_DIR)
    keys = datasets_s3.config_paths([d for d in settings.datasets if d.source.kind == "s3"])
    return {
        "packages": Read(DebPackages),
        "group": Read(GroupMembers, {"group": settings.datasets_group, "users": tuple(sorted(users))}),
        "paths": Read(PathStates, {"paths": (*paths, *keys), "digests": tuple(keys[1:])}),
        "acls": Read(DefaultAcls, {"paths": (settings.datasets_root, *owned)}),
        "accounts": preflight.reads(settings)["accounts"],
        "records": Read(
            DatasetRecords,
            {
                "entries": tuple(
                    (d.name, dataset_records.record_path(STATE_DIR, d.name), stamp_path(d))
                    for d in settings.datasets
                    if d.source.kind in RECORDED
                )
            },
        ),
        **dataset_fanout.reads(settings),
    }


def _acl_is(state: DatasetsState, path: str, entries: tuple[str, ...]) -> bool:
    current = state.acls.get(path)
    return current is not None and set(current) == set(entries)


def _in_group(state: DatasetsState, user: str) -> bool:
    """What server.user(groups=[group], append=True) would find current: the account is in
    the group, and its home directory exists, owned by the user and the group named after it."""
    account = state.accounts.get(user)
    home = account["home_state"] if account else None
    return user in state.group["members"] and home == {"kind": "directory", "user": user, "group": user}


def _lay_out(settings: Settings, state: DatasetsState) -> None:
    group = settings.datasets_group
    unless_current(server.group, current=state.group["exists"], name=f"Create the datasets group {group}", group=group)
    for user in settings.jupyter_users:
        unless_current(
            server.user,
            current=_in_group(state, user.name),
            name=f"Add {user.name} to the group {group}",
            user=user.name,
            groups=[group],
            append=True,
        )
    unless_current(
        files.directory,
        current=path_is(state.paths, settings.datasets_root, "directory", "root", group, "2755"),
        name=f"Create the datasets root {settings.datasets_root}",
        path=settings.datasets_root,
        user="root",
        group=group,
        mode="2755",
    )
    unless_current(
        default_acl,
        current=_acl_is(state, settings.datasets_root, ACL_READONLY),
        name="Set the default ACL of the datasets root",
        path=settings.datasets_root,
        entries=ACL_READONLY,
    )
    for dataset in settings.datasets:
        path = dataset_dir(settings, dataset)
        if SOURCE_KINDS[dataset.source.kind].mounted:
            # A mount point: once mounted, its owner and mode are the export's, not ours.
            unless_current(
                files.directory,
                current=path_is(state.paths, path, "directory"),
                name=f"Create dataset directory {dataset.name}",
                path=path,
            )
            continue
        # files.directory never recurses: nothing that already lives in a dataset is touched.
        mode = "2755" if dataset.readonly else "2775"
        entries = ACL_READONLY if dataset.readonly else ACL_WRITABLE
        unless_current(
            files.directory,
            current=path_is(state.paths, path, "directory", "root", group, mode),
            name=f"Create dataset directory {dataset.name}",
            path=path,
            user="root",
            group=group,
            mode=mode,
        )
        unless_current(
            default_acl,
            current=_acl_is(state, path, entries),
            name=f"Set the default ACL of dataset {dataset.name}",
            path=path,
            entries=entries,
        )


def _packages(settings: Settings, serves_pulls: bool) -> list[str]:
    wanted = ["acl"]
    for kind in sorted({dataset.source.kind for dataset in settings.datasets}):
        wanted += [name for name in SOURCE_KINDS[kind].packages if name not in wanted]
    if serves_pulls and "rsync" not in wanted:
        wanted.append("rsync")
    return wanted


# --- local: pushes from the controller -------------------------------------------------------


def controller_ssh_command(data) -> list[str]:
    """The ssh command line (as a list) with which the controller reaches a host, from its data."""
    ssh = ["ssh", "-o", "BatchMode=yes"]
    if data.get("ssh_port"):
        ssh += ["-p", str(data.get("ssh_port"))]
    if data.get("ssh_key"):
        ssh += ["-i", str(Path(data.get("ssh_key")).expanduser()), "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_known_hosts_file"):
        ssh += ["-o", f"UserKnownHostsFile={Path(data.get('ssh_known_hosts_file')).expanduser()}"]
    if data.get("ssh_strict_host_key_checking"):
        ssh += ["-o", f"StrictHostKeyChecking={data.get('ssh_strict_host_key_checking')}"]
    if data.get("ssh_config_file"):
        ssh += ["-F", str(Path(data.get("ssh_config_file")).expanduser())]
    return ssh


def _remote(user: str | None, address: str, path: str) -> str:
    address = f"[{address}]" if ":" in address else address
    return f"{user}@{address}:{path}" if user else f"{address}:{path}"


def push_command(data, host_name: str, src: str, dest: str, flags: list[str], sudo: bool) -> list[str]:
    """The controller's rsync argv that copies the contents of src into dest on a host."""
    argv = ["rsync", *flags, "--rsh", shlex.join(controller_ssh_command(data))]
    if sudo:
        # -n: a sudo that wants a password fails at once instead of hanging the run.
        argv += ["--rsync-path", "sudo -n rsync"]
    address = data.get("ssh_hostname") or host_name
    return [*argv, src.rstrip("/") + "/", _remote(data.get("ssh_user"), address, dest.rstrip("/") + "/")]


def _run_rsync(state, host, argv: list[str], what: str, files: bytes | None = None) -> bool:
    # A FunctionCommand: pyinfra passes the state and the host it runs for.
    if files == b"":
        host.log_styled(f"{what}: nothing changed since the last verified sync", log_func=_logger().info)
        return True
    ran = subprocess.run(argv, input=files, capture_output=True, check=False)
    completed = subprocess.CompletedProcess(
        argv, ran.returncode, ran.stdout.decode(errors="replace"), ran.stderr.decode(errors="replace")
    )
    moved = [line for line in completed.stdout.splitlines() if parse_rsync_itemized([line])["changes"]]
    host.log_styled(f"{what}: {len(moved)} item(s) synced", log_func=_logger().info)
    if completed.returncode != 0:
        ended = (
            f"rsync exit {completed.returncode}"
            if completed.returncode > 0
            else f"killed by signal {-completed.returncode}"
        )
        host.log_styled(
            f"labfleet: host {host.name}: {what} failed ({ended}): "
            f"{one_line(completed.stderr.splitlines())}; {_advice(completed.returncode)}",
            fg="red",
            log_func=_logger().error,
        )
        return False
    return True


def _advice(returncode: int) -> str:
    # rsync's exit 12 (protocol stream) and 255 (ssh) before anything moved: no rsync there, or no way in.
    if returncode in (12, 255):
        return (
            "check that rsync is installed on both sides and that the SSH settings of this host work, "
            "then run again: what arrived is whole and is not sent twice"
        )
    return "run again: what arrived is whole and is not sent twice"


def _logger():
    from pyinfra import logger

    return logger


def push_dry_run(data, host_name: str, src: str, dest: str, flags: list[str], sudo: bool) -> dict:
    """What a push would change, by rsync --dry-run on the controller: ``{"rc", "changes", "errors"}``.

    ``./run status --verify`` asks this way (with ``--checksum`` in flags); a deploy's push
    runs rsync at once, for the datasets whose record differs.
    """
    argv = push_command(data, host_name, src, dest, flags, sudo)
    dry = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, check=False)
    return {**parse_rsync_itemized(dry.stdout.splitlines()), "rc": dry.returncode, "errors": dry.stderr.splitlines()}


def host_sudo(data, arguments=None) -> bool:
    """Whether the controller's rsync runs as root on the host: the operation's _sudo, else the host's."""
    return bool(arguments["_sudo"] if arguments and "_sudo" in arguments else data.get("_sudo"))


def only_listed(flags: list[str], files: bytes | None) -> list[str]:
    """rsync options that send only the paths given on its input (NUL-ended), when files is not None.

    ``--dirs`` instead of ``--recursive``: a listed directory comes without its contents;
    the directories above a listed path are sent too (``--files-from`` implies ``--relative``).
    """
    if files is None:
        return flags
    return [*("--dirs" if flag == "--recursive" else flag for flag in flags), "--files-from=-", "--from0"]


def _run_rsyncs(state, host, jobs: list[tuple[list[str], str, bytes | None]]) -> bool:
    """Run several pushes to one host at once, at most PARALLEL_PUSHES at a time; each says how it ended."""
    with ThreadPoolExecutor(max_workers=PARALLEL_PUSHES) as pool:
        ended = list(pool.map(lambda job: _run_rsync(state, host, *job), jobs))
    return all(ended)


@operation(is_idempotent=True)
def push_datasets(pushes: list[tuple[str, str, list[str], str, str, bytes | None]]):
    """Copy directories from the controller into this host with rsync, those that differ, several at once.

    + pushes: (directory on the controller, whose contents are copied; directory on the host;
      rsync options, including --itemize-changes; the manifest stamp and the sync record,
      removed before anything moves, so the manifest is verified again and a sync that
      fails half-way leaves no record that could match its source; the paths to send,
      NUL-ended, when only they changed since the host's record (labfleet.dataset_changes),
      else None: the whole tree) per dataset

    The step lists only the datasets whose record differs from their source (see
    labfleet.dataset_records), so a run with nothing to do walks neither tree and plans no
    push; a listed dataset is transferred at once, without a dry run first (a dry run
    walks both trees and opens a connection only to find what the transfer finds again;
    it decided whether to report a change, when every deploy pushed). A dataset whose
    record was missing but whose copy is whole moves nothing and is reported changed, with
    its new record. Transfers of several datasets overlap, at most PARALLEL_PUSHES at a
    time: one host's pushes wait on the network and the host's disk, not on each other.

    **Example:**

    .. code:: python

        push_datasets(name="Push datasets", pushes=[("/data/mnist", "/srv/datasets/mnist",
                      rsync_flags(dataset, "labdata"), "/var/lib/labfleet/datasets/mnist.verified",
                      "/var/lib/labfleet/datasets/mnist.record")])
    """
    if not pushes:
        host.noop("no dataset to push")
        return
    data, name = host.data, host.name
    sudo = host_sudo(data, host.current_op_global_arguments)
    yield "rm -f " + " ".join(shlex.quote(path) for push in pushes for path in push[3:5])
    jobs = [
        (push_command(data, name, src, dest, only_listed(flags, files), sudo), f"push {src} -> {dest}", files)
        for src, dest, flags, _, _, files in pushes
    ]
    yield FunctionCommand(_run_rsyncs, (jobs,), {})


# --- host: pulls from a peer -----------------------------------------------------------------


def _all_settings() -> dict[str, Settings]:
    return {other.name: for_host(other) for other in host.inventory}


def _pullers_of(peer: str) -> list[tuple[Settings, Dataset]]:
    """(puller settings, dataset) for every dataset that some host pulls from peer."""
    return [
        (other, dataset)
        for other in _all_settings().values()
        for dataset in other.datasets
        if dataset.source.kind == "host" and dataset.source.peer == peer
    ]


def serves_peers(peer: str) -> bool:
    """Whether some host pulls from peer: a host: dataset, or a user's files (labfleet.migrate)."""
    all_settings = _all_settings()
    return (
        bool(_pullers_of(peer))
        or any(other.migrate_from == peer for other in all_settings.values())
        or bool(dataset_fanout.children_of(all_settings, peer))
    )


def pull_depth(all_settings: dict[str, Settings], host_name: str, dataset: Dataset, seen=()) -> int:
    """How many pulls stand between a dataset and data that does not come from a peer.

    A peer that itself pulls the path it serves must finish first: pulls run in rounds of
    this depth, so a chain pc03 <- pc02 <- pc01 works in one run.
    """
    if dataset.source.kind != "host":
        return 0
    key = (host_name, dataset.name)
    if key in seen:
        chain = " -> ".join(f"{h}:{d}" for h, d in (*seen, key))
        raise PyinfraError(f"datasets pull from each other in a circle: {chain}; give one of them another source")
    peer, path = pulled_from(dataset)
    peer_settings = all_settings[peer]
    for upstream in peer_settings.datasets:
        if posixpath.normpath(dataset_dir(peer_settings, upstream)) == posixpath.normpath(path):
            return 1 + pull_depth(all_settings, peer, upstream, (*seen, key))
    return 1


def pull_key_path(dataset: Dataset) -> str:
    return posixpath.join(PULL_DIR, f"id_{dataset.name}")


def _key_comment(puller: str, dataset: Dataset) -> str:
    return f"{KEY_TAG}:{dataset.name}@{puller}"


def authorized_key_line(
    public_key: str, path: str, from_address: str | None, rrsync: str, run_as: str | None = None
) -> str:
    """One authorized_keys line that lets a key do a read-only rsync of path, and nothing else.

    + run_as: the account the rsync reads as (through sudo, which labfleet.migrate allows for
      exactly this command); None reads as the sync account itself
    """
    command = f"{rrsync} -ro {shlex.quote(path)}"
    if run_as:
        command = f"sudo -n -u {shlex.quote(run_as)} {command}"
    forced = command.replace("\\", "\\\\").replace('"', '\\"')
    options = ["restrict"]
    if from_address:
        options.append(f'from="{from_address}"')
    options.append(f'command="{forced}"')
    return f"{','.join(options)} {public_key}"


def _source_address(settings: Settings) -> str | None:
    # from= matches the client's IP; a DNS name would only match with sshd's UseDNS on.
    try:
        return str(ipaddress.ip_address(settings.lan_address))
    except ValueError:
        return None


@operation(is_idempotent=True)
def ensure_pull_keys(keys: list[tuple[str, str]]):
    """Make an ed25519 key pair per pulled dataset, once; the private keys never leave this host.

    + keys: (private key path, comment) of each key; the public key is ``<path>.pub``

    **Example:**

    .. code:: python

        ensure_pull_keys(
            name="Make pull keys",
            keys=[("/etc/labfleet/dataset-pull/id_mnist", "labfleet-pull:mnist@pc02")],
        )
    """
    missing = [(path, comment) for path, comment in keys if not host.get_fact(PublicKeyFile, path=f"{path}.pub")]
    if not missing:
        host.noop("the pull keys already exist" if keys else "this host pulls no dataset")
        return
    for path, comment in missing:
        quoted = shlex.quote(path)
        yield f"install -d -m 0700 {shlex.quote(posixpath.dirname(path))} && rm -f {quoted} {quoted}.pub"
        yield f"ssh-keygen -q -t ed25519 -N '' -C {shlex.quote(comment)} -f {quoted}"


@operation(is_idempotent=True)
def trust_peer_host_keys(path: str, peers: list[tuple[str, str, int]]):
    """Write the known_hosts file a puller uses: the host keys of its peers, read from the peers.

    + path: the known_hosts file
    + peers: (inventory name, address, port) of each peer
    """
    if not peers:
        host.noop("this host pulls no dataset")
        return
    lines = []
    for name, address, port in sorted(set(peers)):
        key = host.inventory.get_host(name).get_fact(SshHostKey)
        if key is None:
            # A failing command, not an exception: an exception here would stop every host.
            yield preflight.failing_command(
                f"host {host.name}: the peer {name} has no SSH host key in /etc/ssh, so {host.name} cannot "
                f"check whom it pulls from; install openssh-server on {name} (or run ssh-keygen -A there)"
            )
            return
        pattern = address if port == 22 else f"[{address}]:{port}"
        lines.append(f"{pattern} {key}")
    yield from files.put._inner(src=StringIO("\n".join(lines) + "\n"), dest=path, user="root", group="root", mode="644")


@operation(is_idempotent=True)
def authorize_pullers(path: str, pullers: list[tuple[str, ...]] | list[tuple[str, str, str, str | None]]):
    """Write the sync account's authorized_keys: one forced read-only rrsync per puller and dataset.

    + path: the authorized_keys file of the sync account
    + pullers: (puller host, its public key file, the path it may read, its IP or None), and
      optionally the account the read runs as (labfleet.migrate: the files' owner)

    A puller whose key cannot be read now (it failed earlier in this run) keeps its line, and
    so does every other labfleet-pull line: datasets and migrations write the same file.
    """
    if not pullers:
        host.noop("no host pulls a dataset from this one")
        return
    rrsync = host.get_fact(Which, command=RRSYNC["command"])
    if not rrsync:
        yield preflight.failing_command(
            f"host {host.name}: rrsync is missing, so peers cannot pull datasets from it; it comes with "
            f"{RRSYNC['package']} {RRSYNC['since']} and later ({RRSYNC['path']}); upgrade {RRSYNC['package']}"
        )
        return
    existing = {}
    for line in host.get_fact(FileContents, path=path) or []:
        tag = line.rsplit(" ", 1)[-1]
        if tag.startswith(KEY_TAG + ":"):
            existing[tag] = line
    lines = {}
    for puller, key_path, readable, address, *run_as in pullers:
        public_key = host.inventory.get_host(puller).get_fact(PublicKeyFile, path=f"{key_path}.pub")
        if public_key:
            tag = public_key.rsplit(" ", 1)[-1]
            # Through sudo the path must be the one the sudo rule names (labfleet.migrate).
            lines[tag] = authorized_key_line(
                public_key, readable, address, RRSYNC["path"] if any(run_as) else rrsync, *run_as
            )
    for tag, line in existing.items():
        lines.setdefault(tag, line)
    content = "".join(f"{lines[tag]}\n" for tag in sorted(lines))
    yield from files.put._inner(src=StringIO(content), dest=path, user=SYNC_USER, group=SYNC_USER, mode="600")


def pull_command(peer: Settings, remote_path: str, dest: str, key: str, known_hosts: str, flags: list[str]) -> str:
    """The puller's rsync command line; rrsync on the peer maps "./" to remote_path."""
    del remote_path  # the peer's forced command decides the path; kept for the log and the docs
    ssh = shlex.join(
        [
            "ssh",
            "-i",
            key,
            "-p",
            str(peer.lan_ssh_port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            # A peer that is down or hangs fails the pull instead of holding the run.
            "-o",
            "ConnectTimeout=30",
            "-o",
            "ServerAliveInterval=15",
        ]
    )
    source = _remote(SYNC_USER, peer.lan_address, "./")
    return shlex.join(["rsync", *flags, "--rsh", ssh, source, dest.rstrip("/") + "/"])


@operation(is_idempotent=True)
def pull_datasets(pulls: list[tuple[str, ...]]):
    """Pull datasets from peer hosts with rsync, each only if this host's copy differs.

    + pulls: (peer, path on the peer, rsync command line from pull_command, directory here,
      and the verification stamp and any other files removed when anything moves) of each dataset

    A dry run on this host (a fact) decides; the real rsync runs only for what differs.
    """
    if not pulls:
        host.noop("nothing to pull in this round")
        return
    for peer, remote_path, command, dest, *stamps in pulls:
        if host.inventory.get_host(peer) in host.state.failed_hosts:
            yield preflight.failing_command(
                f"host {host.name}: the peer {peer} failed earlier in this run, so {dest} was not pulled; "
                f"fix what stopped {peer} (its error is above) and run again",
            )
            return
        pending = host.get_fact(RsyncDryRun, command=command)
        if pending["rc"] != 0:
            yield preflight.failing_command(
                f"host {host.name}: cannot pull {peer}:{remote_path} (rsync exit {pending['rc']}): "
                f"{one_line(pending['errors'])}; check lan_address / lan_ssh_port of {peer} "
                f"and that {host.name} reaches it"
            )
            return
        if not pending["changes"]:
            host.noop(f"{dest} already matches {peer}:{remote_path}")
            continue
        yield "rm -f " + " ".join(shlex.quote(stamp) for stamp in stamps)
        yield command


# --- nfs: -------------------------------------------------------------------------------------


def systemd_escape_path(path: str) -> str:
    """What ``systemd-escape --path`` prints: the name of the mount unit for a path (without .mount)."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_.") and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def mount_unit_name(where: str) -> str:
    return systemd_escape_path(where) + ".mount"


def nfs_mount_unit(dataset: Dataset, where: str) -> str:
    """The systemd mount unit that mounts an nfs: dataset read-only at where."""
    what = f"{dataset.source.server}:{dataset.source.export}"
    return (
        "# Written by labfleet (labfleet/datasets.py); edits are replaced on the next run.\n"
        "[Unit]\n"
        f"Description=labfleet dataset {dataset.name} ({what}, read-only)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Mount]\n"
        f"What={what}\n"
        f"Where={where}\n"
        "Type=nfs\n"
        # nofail: a lab NFS server that is down must not keep a workstation from booting.
        "Options=ro,nosuid,nodev,_netdev,nofail\n"
        "TimeoutSec=60\n"
        "\n"
        "[Install]\n"
        "WantedBy=remote-fs.target\n"
    )


def _mount_nfs(settings: Settings, dataset: Dataset) -> None:
    where = dataset_dir(settings, dataset)
    unit = mount_unit_name(where)
    written = files.put(
        name=f"Write the mount unit of dataset {dataset.name}",
        src=StringIO(nfs_mount_unit(dataset, where)),
        dest=f"/etc/systemd/system/{unit}",
        user="root",
        group="root",
        mode="644",
    )
    systemd.daemon_reload(name=f"Reload systemd for dataset {dataset.name}", _if=written.did_change)
    systemd.service(
        name=f"Mount dataset {dataset.name} read-only",
        service=unit,
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"Remount dataset {dataset.name} with its new unit",
        service=unit,
        restarted=True,
        _if=written.did_change,
    )


# --- manifest ---------------------------------------------------------------------------------


@operation(is_idempotent=True)
def verify_manifest(directory: str, manifest: str, stamp: str, label: str):
    """Check a directory against its sha256 manifest (``sha256sum -c``) unless that manifest already passed.

    + directory: the dataset directory
    + manifest: the manifest's path relative to directory, e.g. ``SHA256SUMS``
    + stamp: where the sha256 of the last manifest that passed is kept (a sync removes it)
    + label: how messages name the dataset
    """
    manifest_path = posixpath.join(directory, manifest)
    state = host.get_fact(ManifestState, manifest=manifest_path, stamp=stamp)
    if state["manifest"] is None:
        yield preflight.failing_command(
            f"host {host.name}: {label} has no manifest {manifest}; add it to the source or drop manifest",
        )
        return
    if state["stamp"] == state["manifest"]:
        host.noop(f"{label} already verified against {manifest}")
        return
    header = shlex.quote(
        f"labfleet: host {host.name}: {label} does not match its manifest {manifest}; "
        "these files are missing or differ (sync again, or fix the source):"
    )
    yield (
        f"cd {shlex.quote(directory)} && "
        f"out=$(sha256sum --check --quiet -- {shlex.quote(manifest)} 2>&1); rc=$?; "
        f"if [ $rc -eq 0 ]; then install -d -m 0755 {shlex.quote(posixpath.dirname(stamp))} "
        f"&& echo {state['manifest']} > {shlex.quote(stamp)}; "
        f"else rm -f {shlex.quote(stamp)}; echo {header} >&2; "
        "printf '%s\\n' \"$out\" | grep -v '^sha256sum: WARNING' | sed 's/^/  /' >&2; exit 1; fi"
    )


def _verify(settings: Settings, dataset: Dataset) -> None:
    if dataset.manifest:
        verify_manifest(
            name=f"Verify dataset {dataset.name} against {dataset.manifest}",
            directory=dataset_dir(settings, dataset),
            manifest=dataset.manifest,
            stamp=stamp_path(dataset),
            label=f"dataset {dataset.name}",
        )


# --- the step -------------------------------------------------------------------------------


def _serve_pulls(settings: Settings, state: DatasetsState) -> None:
    unless_current(
        server.user,
        current=SYNC_USER in state.group["accounts"] and SYNC_USER in state.group["members"],
        name=f"Create the account {SYNC_USER} that peers pull datasets through",
        user=SYNC_USER,
        system=True,
        home=SYNC_HOME,
        # The forced command runs through the login shell, so it cannot be nologin; the
        # account has no password and no sudo, and every key it accepts is restricted.
        shell="/bin/sh",
        groups=[settings.datasets_group],
        append=True,
    )
    unless_current(
        files.directory,
        current=path_is(state.paths, SYNC_SSH_DIR, "directory", SYNC_USER, SYNC_USER, "700"),
        name=f"Create {SYNC_SSH_DIR}",
        path=SYNC_SSH_DIR,
        user=SYNC_USER,
        group=SYNC_USER,
        mode="700",
    )


def pull_rounds(all_settings: dict[str, Settings]) -> int:
    """How many rounds of pulls the fleet needs (the longest chain of peers), at most MAX_PULL_DEPTH."""
    depth, deepest = 0, None
    for name, settings in sorted(all_settings.items()):
        for dataset in settings.datasets:
            here = pull_depth(all_settings, name, dataset)
            if here > depth:
                depth, deepest = here, (name, dataset)
    if deepest is not None and depth > MAX_PULL_DEPTH:
        name, dataset = deepest
        raise PyinfraError(
            f"host {name}: datasets.{dataset.name}.source = {dataset.source.text!r} is pulled through a chain of "
            f"{depth} hosts; at most {MAX_PULL_DEPTH} are supported: let some hosts pull from the first peer instead"
        )
    return depth


def _prepare_pulls(settings: Settings, all_settings: dict[str, Settings]) -> None:
    # Every host runs each of these operations, with nothing to do where it neither pulls
    # nor serves: an operation that all hosts share is a barrier in pyinfra's order, so
    # every puller has its key before any peer reads it.
    mine = [d for d in settings.datasets if d.source.kind == "host"]
    served = sorted(_pullers_of(settings.host), key=lambda item: (item[0].host, item[1].name))
    ensure_pull_keys(
        name="Make the keys that pull datasets from peers",
        keys=[(pull_key_path(d), _key_comment(settings.host, d)) for d in mine],
    )
    trust_peer_host_keys(
        name="Trust the host keys of the dataset peers",
        path=KNOWN_HOSTS,
        peers=[
            (peer, all_settings[peer].lan_address, all_settings[peer].lan_ssh_port)
            for peer in sorted(
                {pulled_from(d)[0] for d in mine} | set(dataset_fanout.parents_of(all_settings, settings.host))
            )
        ],
    )
    # In a tree (labfleet.dataset_fanout) the other pullers of a source may pull from this one.
    children = dataset_fanout.children_of(all_settings, settings.host)
    authorize_pullers(
        name="Let peers pull datasets from this host, read-only",
        path=f"{SYNC_SSH_DIR}/authorized_keys",
        pullers=[(p.host, pull_key_path(d), pulled_from(d)[1], _source_address(p)) for p, d in served]
        + [(p.host, pull_key_path(d), here, _source_address(p)) for p, d, here in children],
    )


def _pull_round(settings: Settings, all_settings: dict[str, Settings], depth: int) -> None:
    mine = [d for d in settings.datasets if pull_depth(all_settings, settings.host, d) == depth]
    # A pull whose record equals the peer's copy is not planned (labfleet.dataset_upstream).
    current = {d.name: dataset_upstream.is_current(settings, all_settings, d) for d in mine}
    dataset_upstream.forget_records(settings, [d for d in mine if not current[d.name]])
    # In waves: hosts that pulled a source in an earlier wave serve the later pullers.
    dataset_fanout.pull_in_waves(settings, all_settings, depth, [d for d in mine if not current[d.name]])
    for dataset in mine:
        dataset_upstream.verify_and_record(settings, all_settings, dataset, current[dataset.name])
        dataset_fanout.record_pull(settings, all_settings, dataset)


def _bring_in_manual(settings: Settings, datasets: list[Dataset]) -> None:
    for dataset in datasets:
        _verify(settings, dataset)


def _changed_since(src: str, found: RecordState | None, wanted: SyncRecord | None, prune: bool) -> bytes | None:
    """The paths a push needs to send since the host's record, once per run per pair of
    listings (labfleet.dataset_changes); None: the whole tree."""
    old = found["record"] if found else None
    if old is None or wanted is None or old["settings"] != wanted["settings"]:
        return None
    return planning.current_run().once(
        f"dataset changes {src} {old['source']} {wanted['source']} {prune}",
        lambda: dataset_changes.changed(src, old["source"], wanted["source"], prune),
    )


def _bring_in_local(settings: Settings, datasets: list[Dataset]) -> None:
    if not datasets:
        return
    # The planning batch already holds these readings: this reads nothing from the host.
    state = planning.snapshot(DatasetsState, reads(settings))
    planned = []
    for dataset in datasets:
        src, dest = str(dataset.source.path), dataset_dir(settings, dataset)
        flags = rsync_flags(dataset, settings.datasets_group)
        record = dataset_records.record_path(STATE_DIR, dataset.name)
        wanted = dataset_records.wanted_record(src, dest, flags, dataset.manifest)
        found = state.records.get(dataset.name)
        present = path_is(state.paths, dest, "directory")
        current = dataset_records.is_current(found, wanted, present)
        files = None if current or not present else _changed_since(src, found, wanted, dataset.prune)
        planned.append((dataset, (src, dest, flags, stamp_path(dataset), record, files), wanted, current))
    pushes = [push for _, push, _, current in planned if not current]
    unless_current(push_datasets, current=not pushes, name="Push datasets from the controller", pushes=pushes)
    for dataset, (_, dest, _, stamp, record, _), wanted, current in planned:
        if dataset.manifest:
            unless_current(
                verify_manifest,
                current=current,
                name=f"Verify dataset {dataset.name} against {dataset.manifest}",
                directory=dest,
                manifest=dataset.manifest,
                stamp=stamp,
                label=f"dataset {dataset.name}",
            )
        if wanted is not None:
            unless_current(
                dataset_records.record_sync,
                current=current,
                name=f"Record the verified sync of dataset {dataset.name}",
                path=record,
                record=wanted,
            )


def _bring_in_from_peers(settings: Settings, datasets: list[Dataset]) -> None:
    # Called on every host, whatever it pulls: depth is the same on every host, so every
    # host plans the same operations here, and one call per hop (not a loop) keeps hop 1
    # (a peer pulling) before hop 2 (pulls from it) in pyinfra's order.
    del datasets  # each round picks this host's pulls of its depth
    all_settings = _all_settings()
    depth = pull_rounds(all_settings)
    if depth >= 1:
        _prepare_pulls(settings, all_settings)
        _pull_round(settings, all_settings, 1)
    if depth >= 2:
        _pull_round(settings, all_settings, 2)
    if depth >= 3:
        _pull_round(settings, all_settings, 3)


def _bring_in_s3(settings: Settings, datasets: list[Dataset]) -> None:
    if not datasets:
        return
    state = planning.snapshot(DatasetsState, reads(settings))
    datasets_s3.write_configs(datasets, state.paths)
    all_settings = _all_settings()
    for dataset in datasets:
        # An equal record of the bucket's listing: nothing is planned (labfleet.dataset_upstream).
        current = dataset_upstream.is_current(settings, all_settings, dataset)
        unless_current(
            datasets_s3.sync_bucket,
            current=current,
            name=f"Fetch dataset {dataset.name} from {dataset.source}",
            dataset=dataset,
            dest=dataset_dir(settings, dataset),
            staging=datasets_s3.staging_dir(settings.datasets_root, dataset),
            config=datasets_s3.config_path(dataset),
            group=settings.datasets_group,
            stamp=stamp_path(dataset),
            record=dataset_records.record_path(STATE_DIR, dataset.name),
            take_listing=dataset_upstream.later(all_settings, settings.host, dataset),
        )
        dataset_upstream.verify_and_record(settings, all_settings, dataset, current)


def _bring_in_nfs(settings: Settings, datasets: list[Dataset]) -> None:
    for dataset in datasets:
        _mount_nfs(settings, dataset)
        _verify(settings, dataset)


@dataclass(frozen=True)
class SourceKind:
    """What one kind of dataset source needs: host packages, and how its datasets come in.

    + packages: what the host needs for this kind (``acl`` is always installed)
    + bring_in: plans the operations that fill this kind's datasets on this host; called on
      every host, in this table's order, with this host's datasets of the kind (maybe none)
    + mounted: the dataset directory is a mount point, whose owner, mode and ACL are the
      mounted file system's, so the layout only makes sure it exists
    """

    packages: tuple[str, ...]
    bring_in: Callable[[Settings, list[Dataset]], None]
    mounted: bool = False


# Adding a source kind: one entry here and its bring_in function above (and its form in
# labfleet/settings.py). The order is the order of the step: pushes and fetches before pulls,
# since a peer may serve what the controller pushed to it or what it fetched from a bucket.
SOURCE_KINDS: dict[str, SourceKind] = {
    "local": SourceKind(packages=("rsync",), bring_in=_bring_in_local),
    "s3": SourceKind(packages=("rclone",), bring_in=_bring_in_s3),
    "host": SourceKind(packages=("rsync", "openssh-client"), bring_in=_bring_in_from_peers),
    "nfs": SourceKind(packages=("nfs-common",), bring_in=_bring_in_nfs, mounted=True),
    "manual": SourceKind(packages=(), bring_in=_bring_in_manual),
}


@step("Lay out the dataset directories")
def lay_out_datasets(settings: Settings):
    state = planning.snapshot(DatasetsState, reads(settings))
    serves_pulls = serves_peers(settings.host)
    tools = _packages(settings, serves_pulls)
    unless_current(
        apt.ensure_packages,
        current=not apt.missing_packages(tools, state.packages),
        name="Install the dataset tools",
        packages=tools,
    )
    _lay_out(settings, state)
    if serves_pulls:
        _serve_pulls(settings, state)
    for kind, source_kind in SOURCE_KINDS.items():
        source_kind.bring_in(settings, [d for d in settings.datasets if d.source.kind == kind])
