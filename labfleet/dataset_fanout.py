"""Fan-out of host: pulls: hosts that already hold a copy serve later pullers, a tree, not a star.

With many hosts pulling one peer's dataset at once, every pull queues on that one peer's
disk and uplink. Instead the pulls of one source run in waves: in the first, at most
``dataset_fanout`` hosts pull from the declared peer (the origin); in each later wave,
every host that completed its pull in an earlier wave of this run serves up to its own
``dataset_fanout`` more, and so does the origin. With a bound of 2, 6 pullers need 2 waves
and 26 need 3.

Why it stays as safe as pulling from the origin:

- A host serves only what it pulled from the origin earlier in this same run (or refreshed
  from it: hosts whose record says they hold a verified copy refresh from the origin in the
  first wave, moving only what changed, and do not count against its bound, so they serve
  from the second wave on). A copy from an earlier run is never passed on unrefreshed.
- Only read-only datasets serve (no member can have written there), and only pullers with
  the same source and the same ``prune`` form one tree. Every puller's copy is verified
  against its manifest as before, and the peers' trust is the same narrow kind: a key per
  puller and dataset, accepted only from that puller's address and only for a read-only
  rsync of that one directory (``rrsync -ro``).
- The tree is planned on the controller while the waves run, from what every host's
  planning batch read (who holds a copy) and which hosts this run plans (``--limit``), the
  same plan for every host (``planning.Run.once``). A host whose assigned parent failed
  earlier in the run pulls from the origin instead.

Every host plans the same number of wave operations (pyinfra runs an operation on all
hosts before the next): the waves a tree needs when nobody holds a copy yet. Waves a host
has no pull in report no change.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import operation

from labfleet import dataset_pull, dataset_records, dataset_rsync, dataset_state, planning
from labfleet.facts.datasets import DatasetRecords, RecordState, SyncRecord
from labfleet.planning import Read, unless_current
from labfleet.settings import Dataset, Settings


@dataclass(frozen=True)
class Puller:
    """One host pulling a dataset: its name, whether it may pass the dataset on, and its bound.

    + serves: its copy is read-only, so what it holds is what it pulled
    + bound: its ``dataset_fanout``: how many hosts may pull from it at once (None: no bound)
    """

    name: str
    serves: bool
    bound: int | None


def plan_tree(
    origin: str,
    origin_bound: int | None,
    pullers: list[Puller],
    holders: set[str],
    max_waves: int | None = None,
) -> dict[str, tuple[int, str]]:
    """Who pulls from whom, and in which wave: ``{puller: (wave, parent)}``, waves from 1.

    + origin: the declared peer
    + origin_bound: the origin's ``dataset_fanout`` (None: everyone pulls from it in wave 1)
    + pullers: the hosts pulling this source in this run
    + holders: pullers whose record says they hold a verified copy: they refresh from the
      origin in wave 1 without counting against its bound, then serve
    + max_waves: the waves planned; pullers left over for the last one pull from the origin

    Deterministic: pullers are taken by name, and in each wave the serving hosts take one
    puller each in turn (the hosts that pulled first, by name, the origin last: it served every
    wave before) until their bounds are used up, so that the load spreads across the servers.
    """
    by_name = {puller.name: puller for puller in pullers}
    order = sorted(by_name)
    plan = {name: (1, origin) for name in order if name in holders}
    remaining = [name for name in order if name not in holders]
    peers: list[str] = []
    bounds = {origin: origin_bound, **{name: puller.bound for name, puller in by_name.items()}}
    wave = 1
    while remaining:
        last = max_waves is not None and wave >= max_waves
        servers = [*peers, origin]
        used = dict.fromkeys(servers, 0)
        while remaining:
            free = [s for s in servers if (last and s == origin) or used[s] < (bounds[s] or len(order) + 1)]
            if not free:
                break
            for server in free:
                if not remaining:
                    break
                plan[remaining.pop(0)] = (wave, server)
                used[server] += 1
        served = sorted(name for name, (at, _) in plan.items() if at == wave and by_name[name].serves)
        peers += [name for name in served if name not in peers]
        wave += 1
    return plan


def waves(plan: dict[str, tuple[int, str]]) -> int:
    return max((at for at, _ in plan.values()), default=1)


# --- The trees of a fleet ------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A host in a tree: its settings, its dataset, and the record a verified pull leaves."""

    settings: Settings
    dataset: Dataset

    @property
    def puller(self) -> Puller:
        return Puller(self.settings.host, self.dataset.readonly, self.settings.dataset_fanout)


@dataclass(frozen=True)
class Tree:
    """The pullers of one source (peer, path, prune), when there are more than the peer's bound."""

    origin: str
    path: str
    members: tuple[Member, ...]
    origin_bound: int

    @property
    def key(self) -> str:
        return f"{self.origin}:{self.path}"

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.settings.host == name), None)

    def planned_waves(self) -> int:
        """The waves this tree needs when no puller holds a copy yet: the most it ever uses."""
        return waves(plan_tree(self.origin, self.origin_bound, [m.puller for m in self.members], set()))


def trees(all_settings: dict[str, Settings]) -> list[Tree]:
    """Every source that more hosts pull than its peer's ``dataset_fanout`` lets pull at once."""
    sources: dict[tuple[str, str, bool], list[Member]] = {}
    for name in sorted(all_settings):
        for dataset in all_settings[name].datasets:
            if dataset.source.kind == "host":
                peer, path = dataset_pull.pulled_from(dataset)
                key = (peer, posixpath.normpath(path), dataset.prune)
                sources.setdefault(key, []).append(Member(all_settings[name], dataset))
    found = []
    for (peer, path, _), members in sorted(sources.items()):
        bound = all_settings[peer].dataset_fanout
        if bound is not None and len(members) > bound:
            found.append(Tree(peer, path, tuple(members), bound))
    return found


def tree_of(all_settings: dict[str, Settings], name: str, dataset: Dataset) -> Tree | None:
    for tree in trees(all_settings):
        member = tree.member(name)
        if member is not None and member.dataset == dataset:
            return tree
    return None


def parents_of(all_settings: dict[str, Settings], name: str) -> list[str]:
    """The hosts a puller may pull from besides its declared peers: the servers of its trees."""
    return sorted(
        {
            other.settings.host
            for tree in trees(all_settings)
            if tree.member(name) is not None
            for other in tree.members
            if other.puller.serves and other.settings.host != name
        }
    )


def children_of(all_settings: dict[str, Settings], name: str) -> list[tuple[Settings, Dataset, str]]:
    """(puller settings, its dataset, the directory here it reads) for every host that may pull from this one."""
    found = []
    for tree in trees(all_settings):
        mine = tree.member(name)
        if mine is None or not mine.puller.serves:
            continue
        here = dataset_state.dataset_dir(mine.settings, mine.dataset)
        found += [(m.settings, m.dataset, here) for m in tree.members if m.settings.host != name]
    return found


# --- The record of a verified pull ---------------------------------------------------------


def record_path(dataset: Dataset) -> str:
    return posixpath.join(dataset_state.STATE_DIR, f"{dataset.name}.pulled")


def reads(settings: Settings) -> dict[str, Read]:
    """The records of this host's verified pulls (and their manifest stamps), for the planning batch."""
    entries = tuple(
        (d.name, record_path(d), dataset_state.stamp_path(d)) for d in settings.datasets if d.source.kind == "host"
    )
    return {"pulled": Read(DatasetRecords, {"entries": entries})}


def wanted_record(settings: Settings, dataset: Dataset) -> SyncRecord:
    """What a verified pull of this source, with these settings, records."""
    source = dataset.source.text
    dest = dataset_state.dataset_dir(settings, dataset)
    flags = dataset_rsync.rsync_flags(dataset, settings.datasets_group)
    return SyncRecord(
        source="sha256:" + hashlib.sha256(source.encode()).hexdigest(),
        settings=dataset_records.settings_digest(source, dest, flags, dataset.manifest),
        manifest=dataset_records.NO_MANIFEST,
    )


def holds_copy(member: Member, found: RecordState | None) -> bool:
    if found is None or found["record"] != wanted_record(member.settings, member.dataset):
        return False
    return not member.dataset.manifest or found["stamp"] is not None


def _readings_of(member: Member) -> dict | None:
    """What this member's planning batch read, or None when this run does not plan it."""
    planned = planning.current_run().hosts.get(member.settings.host)
    if planned is None:
        return None
    return planned.readings.get(reads(member.settings)["pulled"].key, {})


def current_plan(tree: Tree) -> dict[str, tuple[int, str]]:
    """This run's tree: the members this run plans, who of them holds a copy; the same for every host."""

    def make() -> dict[str, tuple[int, str]]:
        active, holders = [], set()
        for member in tree.members:
            readings = _readings_of(member)
            if readings is None:
                continue
            active.append(member.puller)
            if holds_copy(member, readings.get(member.dataset.name)):
                holders.add(member.settings.host)
        return plan_tree(tree.origin, tree.origin_bound, active, holders, tree.planned_waves())

    if not host.state.is_executing:
        # pyinfra without -y runs each operation once while planning, to show what would
        # change: not every host is read yet, so that preview's tree is not the run's.
        return make()
    return planning.current_run().once(f"dataset tree {tree.key}", make)


# --- The waves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pull:
    """One dataset this host pulls: where from (the origin, or any server of its tree) and where to.

    + commands: parent host -> the rsync command line that pulls from it
    + forget: files removed before anything moves (the manifest stamp, the pull record)
    """

    dataset: str
    origin: str
    dest: str
    commands: dict[str, str]
    paths: dict[str, str]
    forget: tuple[str, ...]
    tree: Tree | None


def plan_pull(settings: Settings, all_settings: dict[str, Settings], dataset: Dataset) -> Pull:
    peer, path = dataset_pull.pulled_from(dataset)
    dest = dataset_state.dataset_dir(settings, dataset)
    flags = dataset_rsync.rsync_flags(dataset, settings.datasets_group)
    tree = tree_of(all_settings, settings.host, dataset)
    paths = {peer: path}
    if tree is not None:
        for other in tree.members:
            if other.puller.serves and other.settings.host != settings.host:
                paths[other.settings.host] = dataset_state.dataset_dir(other.settings, other.dataset)
    key = dataset_pull.pull_key_path(dataset)
    commands = {
        parent: dataset_pull.pull_command(all_settings[parent], there, dest, key, dataset_pull.KNOWN_HOSTS, flags)
        for parent, there in paths.items()
    }
    forget = (dataset_state.stamp_path(dataset), record_path(dataset)) if tree else (dataset_state.stamp_path(dataset),)
    return Pull(dataset.name, peer, dest, commands, paths, forget, tree)


@operation(is_idempotent=True)
def pull_wave(wave: int, pulls: list[Pull]):
    """Pull this host's datasets that the tree puts in this wave, each from its parent, if it differs.

    + wave: which wave this is (from 1)
    + pulls: every host: dataset of this host in this round (``plan_pull``)

    A pull outside a tree is in wave 1, from its declared peer. A parent that failed earlier
    in this run is replaced by the origin. A dry run on this host decides, as for every pull.
    """
    chosen = []
    for pull in pulls:
        at, parent = (1, pull.origin) if pull.tree is None else current_plan(pull.tree).get(host.name, (0, ""))
        if at != wave:
            continue
        if parent != pull.origin and host.inventory.get_host(parent) in host.state.failed_hosts:
            host.log_styled(
                f"{pull.dataset}: {parent} failed earlier in this run; pulling from {pull.origin} instead",
                log_func=logger.warning,
            )
            parent = pull.origin
        chosen.append((parent, pull.paths[parent], pull.commands[parent], pull.dest, *pull.forget))
    if not chosen:
        host.noop(f"no dataset to pull in wave {wave}")
        return
    for parent, there, *_ in chosen:
        host.log_styled(f"wave {wave}: pulling {parent}:{there}", log_func=logger.info)
    yield from dataset_pull.pull_datasets._inner(pulls=chosen)


def pull_in_waves(settings: Settings, all_settings: dict[str, Settings], depth: int, mine: list[Dataset]) -> None:
    """Plan one hop's pulls: the same number of wave operations on every host.

    + mine: this host's host: datasets of this hop (maybe none: the operations are planned anyway)
    """
    at_depth = [tree for tree in trees(all_settings) if _depth(all_settings, tree) == depth]
    count = max((tree.planned_waves() for tree in at_depth), default=1)
    pulls = [plan_pull(settings, all_settings, dataset) for dataset in mine]
    hop = f", hop {depth}" if depth > 1 else ""
    for wave in range(1, count + 1):
        pull_wave(
            name="Pull datasets from peers" + hop + (f", wave {wave}" if wave > 1 else ""), wave=wave, pulls=pulls
        )


def record_pull(settings: Settings, all_settings: dict[str, Settings], dataset: Dataset) -> None:
    """Record a verified pull of a dataset in a tree (planned after its verification), so the
    next run lets this host serve from the second wave on."""
    if tree_of(all_settings, settings.host, dataset) is None:
        return
    found = planning.read(reads(settings))["pulled"].get(dataset.name)
    unless_current(
        dataset_records.record_sync,
        current=holds_copy(Member(settings, dataset), found),
        name=f"Record the verified pull of dataset {dataset.name}",
        path=record_path(dataset),
        record=wanted_record(settings, dataset),
    )


def _depth(all_settings: dict[str, Settings], tree: Tree) -> int:
    first = tree.members[0]
    return dataset_pull.pull_depth(all_settings, first.settings.host, first.dataset)
