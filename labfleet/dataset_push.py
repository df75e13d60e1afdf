"""local: datasets, pushed from the controller to each host with rsync over pyinfra's SSH settings.

A module of its own because this is the one kind that runs on the controller (rsync started
by pyinfra's FunctionCommand, several per host in threads), with its own failure advice;
the step (labfleet.datasets) only lists it in its table of kinds.
"""

from __future__ import annotations

import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from labfleet import dataset_changes, dataset_records, planning
from labfleet.dataset_rsync import _remote, one_line, rsync_flags
from labfleet.dataset_state import STATE_DIR, DatasetsState, dataset_dir, reads, stamp_path, verify_manifest
from labfleet.facts.datasets import RecordState, SyncRecord, parse_rsync_itemized
from labfleet.facts.system import path_is
from labfleet.planning import unless_current
from labfleet.settings import Dataset, Settings

# How many local: datasets one host receives at once (their dry runs and transfers overlap);
# hosts are pushed to in parallel anyway.
PARALLEL_PUSHES = 4


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
    # One pass over every line: a cold push of 200,000 files prints as many.
    moved = parse_rsync_itemized(completed.stdout.splitlines())["changes"]
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
