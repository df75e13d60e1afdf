"""host: datasets, pulled by each host from a peer, and the narrow trust that lets the peer serve them.

A module of its own because this kind spans hosts: a puller's keys, the peers' host keys and
the sync account's authorized_keys are written on both sides, and pulls run in rounds (chains)
and waves (labfleet.dataset_fanout) that every host plans alike. labfleet.migrate reuses its
keys, trust and rsync command for users' files.
"""

from __future__ import annotations

import ipaddress
import posixpath
import shlex
import time
from io import StringIO

import gevent
from pyinfra import host
from pyinfra.api import operation
from pyinfra.api.exceptions import PyinfraError
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Which
from pyinfra.operations import files, server

from labfleet import dataset_fanout, dataset_state, dataset_upstream, planning, preflight
from labfleet.dataset_rsync import _remote, one_line
from labfleet.facts.datasets import RsyncDryRun
from labfleet.facts.system import PublicKeyFile, PublicKeyFiles, SshHostKey, path_is
from labfleet.planning import Read, unless_current
from labfleet.platform import RRSYNC
from labfleet.settings import Dataset, Settings
from labfleet.snapshot_files import text_sha1

# A puller's keys and the host keys of its peers.
PULL_DIR = "/etc/labfleet/dataset-pull"
KNOWN_HOSTS = f"{PULL_DIR}/known_hosts"
# The account a peer serves pulls from: no sudo, no password, a forced read-only rrsync per key.
SYNC_USER = "labfleet-sync"
SYNC_HOME = "/var/lib/labfleet-sync"
SYNC_SSH_DIR = f"{SYNC_HOME}/.ssh"
AUTHORIZED_KEYS = f"{SYNC_SSH_DIR}/authorized_keys"
KEY_TAG = "labfleet-pull"
# A serving host's own SSH host key, read in its planning batch for the hosts that pull from it.
HOST_KEY = Read(SshHostKey)
# How long a host's planning waits for a peer's planning batch before reading that peer itself.
WAIT_FOR_PEERS_S = 60
# Longest chain of pulls (pc03 <- pc02 <- pc01 is 2) one run can order; see lay_out_datasets.
MAX_PULL_DEPTH = 3


def pulled_from(dataset: Dataset) -> tuple[str, str]:
    """(peer, path on the peer) of a host: dataset; its Source holds both for that kind."""
    peer, path = dataset.source.peer, dataset.source.path
    assert peer is not None and path is not None, dataset
    return peer, path


def _pullers_of(peer: str) -> list[tuple[Settings, Dataset]]:
    """(puller settings, dataset) for every dataset that some host pulls from peer."""
    return [
        (other, dataset)
        for other in dataset_state._all_settings().values()
        for dataset in other.datasets
        if dataset.source.kind == "host" and dataset.source.peer == peer
    ]


def serves_peers(peer: str) -> bool:
    """Whether some host pulls from peer: a host: dataset, or a user's files (labfleet.migrate)."""
    all_settings = dataset_state._all_settings()
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
        if posixpath.normpath(dataset_state.dataset_dir(peer_settings, upstream)) == posixpath.normpath(path):
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
    keys = []
    for name, _, _ in sorted(set(peers)):
        key = host.inventory.get_host(name).get_fact(SshHostKey)
        if key is None:
            # A failing command, not an exception: an exception here would stop every host.
            yield preflight.failing_command(
                f"host {host.name}: the peer {name} has no SSH host key in /etc/ssh, so {host.name} cannot "
                f"check whom it pulls from; install openssh-server on {name} (or run ssh-keygen -A there)"
            )
            return
        keys.append(key)
    text = known_hosts_text(peers, keys)
    yield from files.put._inner(src=StringIO(text), dest=path, user="root", group="root", mode="644")


def known_hosts_text(peers: list[tuple[str, str, int]], keys: list[str]) -> str:
    """The known_hosts file of a puller: keys are the host keys of sorted(set(peers)), in that order."""
    lines = []
    for (_, address, port), key in zip(sorted(set(peers)), keys, strict=True):
        pattern = address if port == 22 else f"[{address}]:{port}"
        lines.append(f"{pattern} {key}")
    return "\n".join(lines) + "\n"


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
    existing = host.get_fact(FileContents, path=path)
    keys = [host.inventory.get_host(puller[0]).get_fact(PublicKeyFile, path=f"{puller[1]}.pub") for puller in pullers]
    content = authorized_keys_text(existing, pullers, keys, rrsync)
    yield from files.put._inner(src=StringIO(content), dest=path, user=SYNC_USER, group=SYNC_USER, mode="600")


def authorized_keys_text(existing: list[str] | None, pullers: list, keys: list[str | None], rrsync: str) -> str:
    """The sync account's authorized_keys: a line per puller whose public key (keys, in the order
    of pullers) is known, and every other labfleet-pull line of the existing file (lines)."""
    kept = {}
    for line in existing or []:
        tag = line.rsplit(" ", 1)[-1]
        if tag.startswith(KEY_TAG + ":"):
            kept[tag] = line
    lines = {}
    for (_, _, readable, address, *run_as), public_key in zip(pullers, keys, strict=True):
        if public_key:
            tag = public_key.rsplit(" ", 1)[-1]
            # Through sudo the path must be the one the sudo rule names (labfleet.migrate).
            lines[tag] = authorized_key_line(
                public_key, readable, address, RRSYNC["path"] if any(run_as) else rrsync, *run_as
            )
    for tag, line in kept.items():
        lines.setdefault(tag, line)
    return "".join(f"{lines[tag]}\n" for tag in sorted(lines))


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


def _serve_pulls(settings: Settings, state: dataset_state.DatasetsState) -> None:
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


def _keys_read(settings: Settings) -> Read:
    """A puller's pull keys, read in its planning batch (and read there by its peers)."""
    paths = tuple(f"{pull_key_path(d)}.pub" for d in settings.datasets if d.source.kind == "host")
    return Read(PublicKeyFiles, {"paths": paths})


def reads(settings: Settings) -> dict[str, Read]:
    """This host's own facts that the trust between pullers and peers is planned from, for the
    planning batch: a puller's keys; a peer's SSH host key, rrsync and authorized_keys (whose
    owner, mode and sha1 come with the datasets step's paths, see ``trust_paths``)."""
    found = {}
    if any(d.source.kind == "host" for d in settings.datasets):
        found["pull_keys"] = _keys_read(settings)
    if serves_peers(settings.host):
        found["host_key"] = HOST_KEY
        found["rrsync"] = Read(Which, {"command": RRSYNC["command"]})
        found["authorized"] = Read(FileContents, {"path": AUTHORIZED_KEYS})
    return found


def trust_paths(settings: Settings) -> list[str]:
    """The files of the trust on this host whose owner, mode and sha1 the planning batch reads."""
    paths = [KNOWN_HOSTS] if any(d.source.kind == "host" for d in settings.datasets) else []
    return paths + ([AUTHORIZED_KEYS] if serves_peers(settings.host) else [])


def _reading_of(name: str, read: Read):
    """What another host's planning batch read, read here without a round trip of its own.

    pyinfra plans the hosts side by side, so that host's batch may still be on its way: wait
    for it once its planning has begun (it starts before the batch's first round trip). A
    host this run does not plan, one not begun (pyinfra plans at most its pool's size of
    hosts at once, so it may start only after this one ends: waiting would stall both), one
    that failed before its batch, or one whose batch does not come is read directly, once
    per run.
    """
    other = host.inventory.get_host(name)
    run = planning.current_run()
    if other in host.state.activated_hosts and name in run.hosts:
        deadline = time.monotonic() + WAIT_FOR_PEERS_S
        while time.monotonic() < deadline and other not in host.state.failed_hosts:
            planned = run.hosts.get(name)
            if planned is not None and read.key in planned.readings:
                return planned.readings[read.key]
            gevent.sleep(0.02)
    return run.once(f"reading of {name}: {read.key}", lambda: other.get_fact(read.fact, **read.kwargs))


def _trusted(state: dataset_state.DatasetsState, peers: list[tuple[str, str, int]]) -> bool:
    """Whether trust_peer_host_keys has nothing to do: known_hosts holds the peers' host keys."""
    if not peers:
        return True
    keys = [_reading_of(name, HOST_KEY) for name, _, _ in sorted(set(peers))]
    if None in keys:
        return False
    text = known_hosts_text(peers, keys)
    return path_is(state.paths, KNOWN_HOSTS, "file", "root", "root", "644", text_sha1(text))


def _authorized(state: dataset_state.DatasetsState, pullers: list, all_settings: dict[str, Settings]) -> bool:
    """Whether authorize_pullers has nothing to do: every puller's key has its line. A puller
    whose key is not there yet (made in this run) leaves it to do."""
    if not pullers:
        return True
    keys = [
        (_reading_of(puller, _keys_read(all_settings[puller])) or {}).get(f"{key_path}.pub")
        for puller, key_path, *_ in pullers
    ]
    if not state.rrsync or None in keys:
        return False
    text = authorized_keys_text(state.authorized, pullers, keys, state.rrsync)
    return path_is(state.paths, AUTHORIZED_KEYS, "file", SYNC_USER, SYNC_USER, "600", text_sha1(text))


def _prepare_pulls(settings: Settings, all_settings: dict[str, Settings]) -> None:
    # Planned together or not at all, decided from the planning batches (each host's own facts
    # in its own): the hosts that plan them share them, and an operation that hosts share is a
    # barrier in pyinfra's order, so every puller has its key before any peer reads it. A
    # puller that makes a key leaves its peers' authorized_keys to do, so they plan them too.
    state = planning.snapshot(dataset_state.DatasetsState, dataset_state.reads(settings))
    mine = [d for d in settings.datasets if d.source.kind == "host"]
    served = sorted(_pullers_of(settings.host), key=lambda item: (item[0].host, item[1].name))
    keys = [(pull_key_path(d), _key_comment(settings.host, d)) for d in mine]
    peers = [
        (peer, all_settings[peer].lan_address, all_settings[peer].lan_ssh_port)
        for peer in sorted(
            {pulled_from(d)[0] for d in mine} | set(dataset_fanout.parents_of(all_settings, settings.host))
        )
    ]
    # In a tree (labfleet.dataset_fanout) the other pullers of a source may pull from this one.
    children = dataset_fanout.children_of(all_settings, settings.host)
    pullers = [(p.host, pull_key_path(d), pulled_from(d)[1], _source_address(p)) for p, d in served] + [
        (p.host, pull_key_path(d), here, _source_address(p)) for p, d, here in children
    ]
    found = state.pull_keys or {}
    current = (
        all(found.get(f"{path}.pub") for path, _ in keys)
        and _trusted(state, peers)
        and _authorized(state, pullers, all_settings)
    )
    unless_current(ensure_pull_keys, current=current, name="Make the keys that pull datasets from peers", keys=keys)
    unless_current(
        trust_peer_host_keys,
        current=current,
        name="Trust the host keys of the dataset peers",
        path=KNOWN_HOSTS,
        peers=peers,
    )
    unless_current(
        authorize_pullers,
        current=current,
        name="Let peers pull datasets from this host, read-only",
        path=AUTHORIZED_KEYS,
        pullers=pullers,
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


def _bring_in_from_peers(settings: Settings, datasets: list[Dataset]) -> None:
    # Called on every host, whatever it pulls: depth is the same on every host, so every
    # host plans the same operations here, and one call per hop (not a loop) keeps hop 1
    # (a peer pulling) before hop 2 (pulls from it) in pyinfra's order.
    del datasets  # each round picks this host's pulls of its depth
    all_settings = dataset_state._all_settings()
    depth = pull_rounds(all_settings)
    if depth >= 1:
        _prepare_pulls(settings, all_settings)
        _pull_round(settings, all_settings, 1)
    if depth >= 2:
        _pull_round(settings, all_settings, 2)
    if depth >= 3:
        _pull_round(settings, all_settings, 3)
