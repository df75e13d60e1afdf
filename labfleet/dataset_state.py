"""What every dataset source kind shares: where a dataset lives on a host, its manifest stamp,
and the one planning snapshot of the datasets step (DatasetsState, reads).

A module of its own because the step's table of kinds (labfleet.datasets.SOURCE_KINDS) imports
every kind's module, and each kind plans from this snapshot and these paths: kept here, they
import nothing that imports a kind, and no kind imports the table.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.deb import DebPackages

from labfleet import dataset_fanout, dataset_pull, dataset_records, datasets_s3, preflight
from labfleet.facts.datasets import DatasetRecords, DefaultAcls, ManifestState, RecordState
from labfleet.facts.system import Account, GroupMembers, PathState, PathStates
from labfleet.planning import Read
from labfleet.settings import Dataset, Settings, for_host

# Where a host keeps the sha256 of the manifest it last verified, per dataset.
STATE_DIR = "/var/lib/labfleet/datasets"
# The kinds whose hosts keep a record of their last verified sync (labfleet.dataset_records).
RECORDED = ("local", "s3", "host")


def dataset_dir(settings: Settings, dataset: Dataset) -> str:
    return posixpath.join(settings.datasets_root, dataset.name)


def stamp_path(dataset: Dataset) -> str:
    return posixpath.join(STATE_DIR, f"{dataset.name}.verified")


def _all_settings() -> dict[str, Settings]:
    return {other.name: for_host(other) for other in host.inventory}


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
    # The trust of host: pulls (labfleet.dataset_pull.reads), read only where a host pulls or serves.
    pull_keys: dict[str, str | None] | None = None  # PublicKeyFiles of this host's pull keys
    host_key: str | None = None  # SshHostKey
    rrsync: str | None = None  # Which rrsync
    authorized: list[str] | None = None  # FileContents of the sync account's authorized_keys


def reads(settings: Settings) -> dict[str, Read]:
    """The facts the datasets step decides from while planning, by DatasetsState's field names."""
    # The table of kinds lives with the step, which imports every kind, and the kinds read this
    # snapshot: imported here, when called, it makes no import cycle.
    from labfleet.datasets import SOURCE_KINDS

    owned = [dataset_dir(settings, d) for d in settings.datasets if not SOURCE_KINDS[d.source.kind].mounted]
    users = {user.name for user in settings.jupyter_users}
    paths = [settings.datasets_root, *(dataset_dir(settings, d) for d in settings.datasets)]
    if dataset_pull.serves_peers(settings.host):
        users.add(dataset_pull.SYNC_USER)
        paths.append(dataset_pull.SYNC_SSH_DIR)
    keys = datasets_s3.config_paths([d for d in settings.datasets if d.source.kind == "s3"])
    trust = dataset_pull.trust_paths(settings)
    return {
        "packages": Read(DebPackages),
        "group": Read(GroupMembers, {"group": settings.datasets_group, "users": tuple(sorted(users))}),
        "paths": Read(PathStates, {"paths": (*paths, *keys, *trust), "digests": (*keys[1:], *trust)}),
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
        **dataset_pull.reads(settings),
    }


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
