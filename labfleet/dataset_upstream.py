"""Whether a host: or s3: dataset needs a sync, decided without walking the host's copy.

A local: dataset compares the host's record of its last verified sync with one walk of the
source on the controller (labfleet.dataset_records). The two kinds whose source the
controller cannot walk keep the same record and compare it with their source's own listing:

- s3: the bucket's listing, taken once per run per source (endpoint, bucket and prefix) on
  one host that declares it: rclone's path, size and LastModified of every object, sorted
  and hashed there (labfleet.facts.datasets.BucketListing), so only a digest crosses the
  link. Size and LastModified are what the sync itself compares, and every upload sets
  LastModified. The first LISTERS hosts in inventory order that declare the source are
  asked in turn, and the first that answers lists: one without the keys or rclone yet (a
  new host) is passed over. When none can while planning (the fleet's first run: no host
  has the keys yet), the listing is taken while the run executes, by the first sync of
  that source, before it fetches anything: a record never names a bucket newer than the
  copy it describes.
- host: the record the peer's copy will hold once the peer's own sync of this run is done
  (what its record is now when that sync has nothing to do), followed through peers that
  pull themselves. Not the record file as it is on the peer while planning: the peer may
  sync in this very run, before the pull. The puller's record names the peer and that
  record, so a new copy on the peer makes the pull run. A pull whose path is no dataset of
  the peer, or comes from a manual or nfs: dataset, or from a peer outside this run
  (``--limit``), has no such record: it decides by its dry run, as before.

What this cannot see is what the local: record cannot see either (README, "Re-runs with a
dataset declared"): a change made by hand under a dataset on a host, and an s3: object
rewritten with the same size within the same second; ``./run status --verify`` finds the
first kind of change for host: datasets.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable

from pyinfra import host
from pyinfra.operations import files

from labfleet import dataset_pull, dataset_records, dataset_rsync, dataset_state, datasets_s3, planning
from labfleet.facts.datasets import BucketListing, SyncRecord, render_record
from labfleet.facts.system import path_is
from labfleet.planning import unless_current
from labfleet.settings import Dataset, Settings

# How many hosts are asked for a bucket's listing before the run gives up on it while planning.
LISTERS = 3


def _in_this_run(name: str) -> bool:
    other = host.inventory.get_host(name)
    return other in host.state.activated_hosts and other not in host.state.failed_hosts


def listers(all_settings: dict[str, Settings], source: Dataset) -> list[tuple[str, Dataset]]:
    """The hosts of this run that declare the same s3: source, in inventory order, with their dataset."""
    found = []
    for name, settings in all_settings.items():
        for dataset in settings.datasets:
            same = (dataset.source.text, dataset.source.endpoint) == (source.source.text, source.source.endpoint)
            if dataset.source.kind == "s3" and same and _in_this_run(name):
                found.append((name, dataset))
                break
    return found


def bucket_listing(all_settings: dict[str, Settings], dataset: Dataset) -> str | None:
    """The digest of an s3: source's listing, taken once per run; None when no host could list it.

    While the run executes, a listing that planning could not take is taken then (once).
    """
    key = f"s3 listing {dataset.source.endpoint} {dataset.source.text}"
    run = planning.current_run()

    def take() -> str | None:
        for name, declared in listers(all_settings, dataset)[:LISTERS]:
            config = datasets_s3.config_path(declared)
            found = host.inventory.get_host(name).get_fact(
                BucketListing, command=datasets_s3.listing_command(config, declared.source)
            )
            if found["digest"] is not None:
                return found["digest"]
        return None

    planned = run.once(key, take if not host.state.is_executing else lambda: None)
    if planned is not None or not host.state.is_executing:
        return planned
    return run.once(key + " (while executing)", take)


def _upstream_of(all_settings: dict[str, Settings], dataset: Dataset) -> tuple[str, Dataset] | None:
    """The peer and its dataset that a host: dataset pulls, when the path is one of the peer's datasets."""
    peer, path = dataset_pull.pulled_from(dataset)
    if peer not in all_settings or not _in_this_run(peer):
        return None
    peer_settings = all_settings[peer]
    for upstream in peer_settings.datasets:
        if posixpath.normpath(dataset_state.dataset_dir(peer_settings, upstream)) == posixpath.normpath(path):
            return peer, upstream
    return None


def wanted(all_settings: dict[str, Settings], host_name: str, dataset: Dataset) -> SyncRecord | None:
    """The record a verified sync of this dataset on this host would leave now; None when not knowable.

    local: the controller's walk (dataset_records.wanted_record); s3: the bucket's listing;
    host: the peer's own wanted record, named with the peer. Loops are refused before
    (dataset_pull.pull_depth), so following peers ends.
    """
    settings = all_settings[host_name]
    dest = dataset_state.dataset_dir(settings, dataset)
    group = settings.datasets_group
    manifest = dataset_records.VERIFIED if dataset.manifest else dataset_records.NO_MANIFEST
    kind = dataset.source.kind
    if kind == "local":
        flags = dataset_rsync.rsync_flags(dataset, group)
        return dataset_records.wanted_record(str(dataset.source.path), dest, flags, dataset.manifest)
    if kind == "s3":
        listing = bucket_listing(all_settings, dataset)
        if listing is None:
            return None
        shape = datasets_s3.sync_shape(dataset, dest, group)
        settings_digest = dataset_records.settings_digest(dataset.source.text, dest, shape, dataset.manifest)
        return SyncRecord(source=listing, settings=settings_digest, manifest=manifest)
    if kind == "host":
        upstream = _upstream_of(all_settings, dataset)
        theirs = wanted(all_settings, *upstream) if upstream else None
        if upstream is None or theirs is None:
            return None
        named = f"host {upstream[0]} dataset {upstream[1].name}\n{render_record(theirs)}"
        flags = dataset_rsync.rsync_flags(dataset, group)
        return SyncRecord(
            source="sha256:" + hashlib.sha256(named.encode()).hexdigest(),
            settings=dataset_records.settings_digest(dataset.source.text, dest, flags, dataset.manifest),
            manifest=manifest,
        )
    return None


def recordable(all_settings: dict[str, Settings], host_name: str, dataset: Dataset) -> bool:
    """Whether this run can know the record of this dataset: its peers lead to a local: or s3: source."""
    if dataset.source.kind == "host":
        upstream = _upstream_of(all_settings, dataset)
        return upstream is not None and recordable(all_settings, *upstream)
    return dataset.source.kind in ("local", "s3")


def later(all_settings: dict[str, Settings], host_name: str, dataset: Dataset) -> Callable[[], SyncRecord | None]:
    """wanted() as a function the operations call while the run executes (the record, the sync's listing)."""
    return lambda: wanted(all_settings, host_name, dataset)


def is_current(settings: Settings, all_settings: dict[str, Settings], dataset: Dataset) -> bool:
    """Whether this host's copy needs no sync: its record (read in the planning batch) equals wanted()."""
    found = planning.read(dataset_state.reads(settings))
    present = path_is(found["paths"], dataset_state.dataset_dir(settings, dataset), "directory")
    return dataset_records.is_current(
        found["records"].get(dataset.name), wanted(all_settings, settings.host, dataset), present
    )


def forget_records(settings: Settings, due: list[Dataset]) -> None:
    """Remove the records of the host: datasets about to be pulled, before the pull moves anything:
    a pull that fails half-way must leave no record that a later run could find equal."""
    found = planning.read(dataset_state.reads(settings))["records"]
    for dataset in due:
        record = dataset_records.record_path(dataset_state.STATE_DIR, dataset.name)
        unless_current(
            files.file,
            current=(found.get(dataset.name) or {}).get("record") is None,
            name=f"Forget the recorded pull of dataset {dataset.name}",
            path=record,
            present=False,
        )


def verify_and_record(settings: Settings, all_settings: dict[str, Settings], dataset: Dataset, current: bool) -> None:
    """After a sync of this round: the manifest check, then the record; neither planned when current."""
    if dataset.manifest:
        unless_current(
            dataset_state.verify_manifest,
            current=current,
            name=f"Verify dataset {dataset.name} against {dataset.manifest}",
            directory=dataset_state.dataset_dir(settings, dataset),
            manifest=dataset.manifest,
            stamp=dataset_state.stamp_path(dataset),
            label=f"dataset {dataset.name}",
        )
    if not recordable(all_settings, settings.host, dataset):
        return
    unless_current(
        dataset_records.record_sync,
        current=current,
        name=f"Record the verified sync of dataset {dataset.name}",
        path=dataset_records.record_path(dataset_state.STATE_DIR, dataset.name),
        record=later(all_settings, settings.host, dataset),
    )
