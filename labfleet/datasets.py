"""Datasets: one layout on every host, kept in sync with its source, never deleted.

Layout. ``datasets_root`` and every dataset directory belong to root and the datasets group
(``labdata``), setgid so that whatever is created inside keeps that group, with a default
ACL so that new files get the group's permissions whatever the creator's umask: read-only
datasets give the group r-x, ``readonly: False`` datasets give it rwx (lab members write
there). The jupyter users join the group.

Sources (``Dataset.source.kind``; each is one entry of ``SOURCE_KINDS`` and its bring_in function):

- ``manual``: the directory only.
- ``local:<path>``: pushed from the controller with rsync (labfleet.dataset_push), over the SSH settings pyinfra
  uses for that host. The host's record of its last verified sync, against one walk of the
  source per run, decides whether to sync at all (labfleet.dataset_records); then rsync
  moves only what differs.
- ``host:<peer>:<path>``: pulled by this host from a peer (labfleet.dataset_pull), so a large dataset crosses the
  controller's link once. The trust is narrow: each puller has its own key per dataset,
  made on the puller (the private key never leaves it), and the peer accepts that key only
  for a dedicated account without sudo, only from the puller's address, and only for a
  read-only rsync of that one path (``restrict,from=...,command="rrsync -ro <path>"``).
- ``nfs:<server>:<export>``: a read-only systemd mount unit, enabled at boot (labfleet.dataset_nfs).
- ``s3:<bucket>/<prefix>``: fetched by the host with rclone (labfleet.datasets_s3), its keys
  in a root-only rclone config file.

Never delete: rsync runs without ``--delete`` unless the dataset says ``prune: True``, and
writes each file to a temporary name that it renames only when the file is complete, so a
killed transfer leaves no half-written file in place. An optional sha256 manifest is
checked after every sync that changed something; a mismatch stops that host with the list
of bad files.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files, server

from labfleet import (
    apt,
    dataset_nfs,
    dataset_pull,
    dataset_push,
    dataset_records,
    dataset_upstream,
    datasets_s3,
    planning,
)
from labfleet.dataset_state import STATE_DIR, DatasetsState, _all_settings, _verify, dataset_dir, reads, stamp_path
from labfleet.facts.datasets import DefaultAcls
from labfleet.facts.system import path_is
from labfleet.planning import step, unless_current
from labfleet.settings import Dataset, Settings

# Default ACLs: read-only datasets never give the group write, writable ones always do.
ACL_READONLY = ("user::rwx", "group::r-x", "other::r-x")
ACL_WRITABLE = ("user::rwx", "group::rwx", "other::r-x")


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


def _bring_in_manual(settings: Settings, datasets: list[Dataset]) -> None:
    for dataset in datasets:
        _verify(settings, dataset)


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


# Adding a source kind: one entry here and its bring_in function (above, or in its own module;
# and its form in labfleet/settings.py). The order is the order of the step: pushes and fetches before pulls,
# since a peer may serve what the controller pushed to it or what it fetched from a bucket.
SOURCE_KINDS: dict[str, SourceKind] = {
    "local": SourceKind(packages=("rsync",), bring_in=dataset_push._bring_in_local),
    "s3": SourceKind(packages=("rclone",), bring_in=_bring_in_s3),
    "host": SourceKind(packages=("rsync", "openssh-client"), bring_in=dataset_pull._bring_in_from_peers),
    "nfs": SourceKind(packages=("nfs-common",), bring_in=dataset_nfs._bring_in_nfs, mounted=True),
    "manual": SourceKind(packages=(), bring_in=_bring_in_manual),
}


@step("Lay out the dataset directories")
def lay_out_datasets(settings: Settings):
    state = planning.snapshot(DatasetsState, reads(settings))
    serves_pulls = dataset_pull.serves_peers(settings.host)
    tools = _packages(settings, serves_pulls)
    unless_current(
        apt.ensure_packages,
        current=not apt.missing_packages(tools, state.packages),
        name="Install the dataset tools",
        packages=tools,
    )
    _lay_out(settings, state)
    if serves_pulls:
        dataset_pull._serve_pulls(settings, state)
    for kind, source_kind in SOURCE_KINDS.items():
        source_kind.bring_in(settings, [d for d in settings.datasets if d.source.kind == kind])
