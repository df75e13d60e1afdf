"""``./run status --verify``: every synced dataset compared in full with its source, on demand.

A deploy skips a local:, host: or s3: dataset whose record matches its source
(labfleet.dataset_records, labfleet.dataset_upstream), so it does not see a file changed by
hand on a host, nor a source file rewritten with the same size and time. This comparison
sees both: it is the rsync dry run a sync would make, with ``--checksum``, so both sides
read every byte. That is why it is not part of every
deploy: on an ImageNet-sized dataset it takes as long as reading the dataset.

local: datasets are compared from the controller (its rsync against the host's, as a push);
host: datasets on the puller (its rsync against the peer's read-only rrsync, as a pull, read
in the status's batch). Files a lab member added are not drift unless the dataset says
``prune: True``; then they show as what the next sync would delete. s3: datasets are
compared on the host by ``rclone check`` (sizes and MD5s: the ETag of an object uploaded in
one part; one uploaded in parts is compared by size). nfs: and manual datasets keep the
status they have without --verify.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pyinfra import host

from labfleet import dataset_pull, dataset_push, dataset_records, dataset_rsync, dataset_state, datasets_s3
from labfleet.facts.datasets import RcloneCheck, RsyncDryRun
from labfleet.planning import Read
from labfleet.settings import Dataset, Settings

VERIFY_ENV = "LABFLEET_STATUS_VERIFY"
# How many differing paths a drift line names.
SHOWN = 5


def wanted() -> bool:
    return os.environ.get(VERIFY_ENV) == "1"


def _flags(settings: Settings, dataset: Dataset) -> list[str]:
    return [*dataset_rsync.rsync_flags(dataset, settings.datasets_group), "--checksum"]


def reads(settings: Settings) -> dict[str, Read]:
    """The host's side of the comparison: a checksum dry run of each host: pull, by ``verify <name>``."""
    if not wanted():
        return {}
    all_settings = dataset_state._all_settings()
    out = {}
    for dataset in settings.datasets:
        if dataset.source.kind == "s3":
            out[f"verify {dataset.name}"] = _s3_check(settings, dataset)
        if dataset.source.kind != "host":
            continue
        peer, path = dataset_pull.pulled_from(dataset)
        command = dataset_pull.pull_command(
            all_settings[peer],
            path,
            dataset_state.dataset_dir(settings, dataset),
            dataset_pull.pull_key_path(dataset),
            dataset_pull.KNOWN_HOSTS,
            _flags(settings, dataset),
        )
        out[f"verify {dataset.name}"] = Read(RsyncDryRun, {"command": command})
    return out


def _s3_check(settings: Settings, dataset: Dataset) -> Read:
    """rclone check of the bucket against the host's copy, on the host: sizes and MD5s (every local byte)."""
    dest = dataset_state.dataset_dir(settings, dataset)
    args = ["check", datasets_s3.remote(dataset.source), dest]
    if not dataset.prune:
        args.append("--one-way")
    return Read(RcloneCheck, {"command": datasets_s3.rclone(datasets_s3.config_path(dataset), *args)})


def describe(source: str, dry_run: Mapping) -> str | None:
    """One drift line from a dry run's result, or None when the copy matches its source."""
    if dry_run["rc"] != 0:
        return (
            f"could not be compared with {source} ({dry_run.get('tool', 'rsync')} exit {dry_run['rc']}): "
            f"{dataset_rsync.one_line(list(dry_run['errors']), 300)}"
        )
    paths = dry_run.get("paths") or [line[12:].strip() for line in dry_run["changes"]]
    if not paths:
        return None
    shown = ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
    return f"{len(paths)} item(s) differ from {source}: {shown}"


def differences(settings: Settings, found: Mapping) -> dict[str, str]:
    """Per compared dataset that differs from its source (or could not be compared), why.

    + found: the status's readings, with ``reads``'s ``verify <name>`` among them
    """
    if not wanted():
        return {}
    out = {}
    for dataset in settings.datasets:
        dest = dataset_state.dataset_dir(settings, dataset)
        if dataset.source.kind == "local":
            dry_run = dataset_push.push_dry_run(
                host.data,
                host.name,
                str(dataset.source.path),
                dest,
                _flags(settings, dataset),
                dataset_push.host_sudo(host.data),
            )
        elif dataset.source.kind == "host":
            dry_run = found[f"verify {dataset.name}"]
        elif dataset.source.kind == "s3":
            checked = found[f"verify {dataset.name}"]
            dry_run = {**checked, "paths": checked["paths"] + (checked["extra"] if dataset.prune else [])}
        else:
            continue
        why = describe(str(dataset.source), dry_run)
        if why is None:
            continue
        # Every compared kind skips a sync whose record matches its source (labfleet.dataset_upstream).
        if dry_run["rc"] == 0:
            record = dataset_records.record_path(dataset_state.STATE_DIR, dataset.name)
            why += (
                f"; a deploy does not redo a sync it recorded: remove those files and {record} on {settings.host}, "
                "then deploy"
            )
        out[dataset.name] = why
    return out
