"""s3: datasets: a bucket (or a prefix of it) copied onto each host with rclone from the distribution.

Why these choices:

- The keys go to the host as an rclone config file (0600 root, in a 0700 directory), named
  by ``--config``: never in process arguments, never in pyinfra's output, never in the
  environment of a process another user could read.
- rclone compares size and modification time (the bucket's own LastModified, read from the
  listing with ``--use-server-modtime``, so no request per object); only what differs moves.
  An object whose bytes equal the file's (same size, same MD5) but whose time differs counts
  as current: rclone checks the hash before it calls such a file changed.
- Never a half-written file in place: rclone 1.60 (Debian 12 and 13) writes local files
  under their final name, so the objects that differ are first fetched into a staging
  directory beside the dataset (``<datasets_root>/.labfleet-incoming/<name>``, root only, on
  the same file system), given the dataset's owner and modes there, and then renamed into
  place. Staging is synced to exactly the list of objects that differ, so a file a killed
  run completed is kept (and not fetched twice), and one it left half-written, or one no
  longer wanted, is replaced or removed before anything is renamed.
- Nothing is deleted unless the dataset says ``prune: True``; then the files that the bucket
  no longer has are listed (``rclone check``) and exactly those are removed.
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
from collections.abc import Callable
from io import StringIO
from urllib.parse import urlparse

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from labfleet import preflight
from labfleet.facts.datasets import RcloneDryRun
from labfleet.facts.system import PathState, path_is
from labfleet.model import Dataset, Source, s3_credentials
from labfleet.planning import unless_current

# One rclone config per dataset, root only: it holds that dataset's keys.
CONFIG_DIR = "/etc/labfleet/dataset-s3"
# The name of the remote inside each config file.
REMOTE = "bucket"
# Beside the datasets, on their file system, so that moving a fetched file in is a rename.
INCOMING = ".labfleet-incoming"
# Given dest and staging, and staging's directories one per line on its input: each directory
# made in dest, and the files staged in it renamed there by mv (rename(2): a file that replaces
# one is renamed over it, so readers see the old file or the new one), one mv per directory.
MOVE_INTO_PLACE = (
    'set -e; d=$1; s=$2; while IFS= read -r x; do t="$d${x#"$s"}"; mkdir -p -- "$t"; '
    'find "$x" -maxdepth 1 -type f -exec mv -f -t "$t" -- {} +; done'
)
# The most bytes of paths the fetch's list is written with from the command line (else listed again).
INLINE_LIST_BYTES = 64 * 1024
# The path of each object that a dry run would copy, from rclone's log (as
# labfleet.facts.datasets.parse_rclone_dry_run reads it, for sed on the host).
SKIPPED_COPY_SED = r"s|^[0-9/]* [0-9:]* NOTICE: \(.*\): Skipped copy as --dry-run is set (size [^)]*)$|\1|p"


def config_path(dataset: Dataset) -> str:
    return posixpath.join(CONFIG_DIR, f"{dataset.name}.conf")


def staging_dir(datasets_root: str, dataset: Dataset) -> str:
    return posixpath.join(datasets_root, INCOMING, dataset.name)


def remote(source: Source) -> str:
    """rclone's name for the bucket and prefix of an s3: source, e.g. ``bucket:lab-data/train``."""
    return f"{REMOTE}:{source.bucket}/{source.path}" if source.path else f"{REMOTE}:{source.bucket}"


def rclone_config(source: Source) -> str:
    """The host's rclone config for an s3: source, from the controller's credentials file."""
    assert source.credentials_file and source.endpoint, source
    keys = s3_credentials(source.credentials_file)
    host_name = urlparse(source.endpoint).hostname or ""
    lines = [
        f"[{REMOTE}]",
        "type = s3",
        # "Other" speaks plain S3 with path-style addresses, which every S3-compatible server takes.
        f"provider = {'AWS' if host_name.endswith('.amazonaws.com') else 'Other'}",
        f"endpoint = {source.endpoint}",
        f"access_key_id = {keys['aws_access_key_id']}",
        f"secret_access_key = {keys['aws_secret_access_key']}",
    ]
    if "region" in keys:
        lines.append(f"region = {keys['region']}")
    return "# Written by labfleet (labfleet/datasets_s3.py) from s3_credentials_file; edits are replaced.\n" + (
        "\n".join(lines) + "\n"
    )


def rclone(config: str, *args: str) -> str:
    """An rclone command line that reads its remote from config.

    The server's LastModified is each object's time, and the bucket is listed in one go
    (``--fast-list``): a listing call per thousand objects, not one per "directory".
    """
    return shlex.join(["rclone", "--config", config, "--use-server-modtime", "--fast-list", *args])


def listing_command(config: str, source: Source) -> str:
    """The rclone command line that lists every object under an s3: source: path, size, LastModified.

    What a sync compares (``--use-server-modtime``: no request per object). Not the ETag:
    rclone reads the MD5 of an object uploaded in parts with one more request per object.
    """
    return rclone(config, "lsf", "--recursive", "--files-only", "--format", "pst", remote(source))


def sync_shape(dataset: Dataset, dest: str, group: str) -> list[str]:
    """What shapes an s3: sync besides the bucket's objects, for the record's settings digest."""
    return [f"endpoint={dataset.source.endpoint}", f"prune={dataset.prune}", f"modes={file_modes(dataset)}",
            f"group={group}", f"dest={dest}"]  # fmt: skip


def config_sha1(source: Source) -> str:
    """The sha1 of the host's rclone config for source (what PathStates reads back)."""
    return hashlib.sha1(rclone_config(source).encode()).hexdigest()


def file_modes(dataset: Dataset) -> str:
    """chmod's modes for fetched files: what rsync_flags gives pushed and pulled files."""
    return "u+rw,go+r,go-w" if dataset.readonly else "ug+rw,o+r,o-w"


@operation(is_idempotent=True)
def sync_bucket(
    dataset: Dataset,
    dest: str,
    staging: str,
    config: str,
    group: str,
    stamp: str,
    record: str | None = None,
    take_listing: Callable[[], object] | None = None,
):
    """Copy an s3: dataset's objects into its directory on this host, only those that differ.

    + dataset: the dataset (its source names bucket, prefix and endpoint; prune deletes what the bucket lost)
    + dest: the dataset directory
    + staging: root-only directory on dest's file system that objects are fetched into first
    + config: the rclone config file with the keys (written by write_configs)
    + group: the datasets group, which owns every fetched file
    + stamp: file that is removed when anything moves, so the manifest is verified again
    + record: the record of the last verified sync (labfleet.dataset_records), removed with the stamp
    + take_listing: called first, so that the bucket's listing the record will name (when the
      run could not list it while planning) is older than anything this sync fetches

    A dry run (``rclone copy --dry-run``, or ``sync`` with prune) on this host decides; only
    when it lists something does the transfer run, so a re-run reports no change.

    **Example:**

    .. code:: python

        sync_bucket(name="Fetch imagenet", dataset=dataset, dest="/srv/datasets/imagenet",
                    staging="/srv/datasets/.labfleet-incoming/imagenet",
                    config="/etc/labfleet/dataset-s3/imagenet.conf", group="labdata",
                    stamp="/var/lib/labfleet/datasets/imagenet.verified")
    """
    if take_listing is not None:
        take_listing()
    source = dataset.source
    bucket = remote(source)
    label = f"dataset {dataset.name}"
    pending = host.get_fact(RcloneDryRun, command=rclone(config, "sync" if dataset.prune else "copy", bucket, dest))
    if pending["rc"] != 0:
        yield preflight.failing_command(
            f"host {host.name}: {label}: rclone cannot read {source} from {source.endpoint} "
            f"(rclone exit {pending['rc']}): {pending['error']}; check s3_endpoint, the bucket and prefix, "
            "and the keys in s3_credentials_file"
        )
        return
    if not pending["changes"]:
        host.noop(f"{dest} already matches {source}")
        return
    failed = shlex.quote(
        f"labfleet: host {host.name}: {label}: fetching {source} from {source.endpoint} failed (rclone exit"
    )
    retry = shlex.quote("; run again: what arrived whole is kept and not fetched twice")
    q_dest, q_staging, q_list = shlex.quote(dest), shlex.quote(staging), shlex.quote(f"{staging}.list")
    # Each rclone's log goes to a file, and only its last error line (never a key) to stderr.
    run = (
        'run() { "$@" >"$log" 2>&1 && return 0; rc=$?; '
        "err=$(grep -E 'ERROR|CRITICAL|Failed' \"$log\" | tail -n 1 | cut -c1-500); "
        f'echo {failed} "$rc):" "${{err:-killed or stopped}}"{retry} >&2; exit 1; }}'
    )
    commands = [
        "set -eu",
        "log=$(mktemp)",
        "trap 'rm -f \"$log\"' EXIT",
        run,
        "rm -f " + " ".join(shlex.quote(path) for path in (stamp, record) if path),
        f"install -d -m 0700 -o root -g root {shlex.quote(posixpath.dirname(staging))} {q_staging}",
        *_copy_list(pending.get("copies"), config, bucket, dest, q_list),
        "run " + rclone(config, "sync", bucket, staging, "--files-from-raw", f"{staging}.list", "--delete-excluded"),
        f"find {q_staging} -type f -exec chown root:{shlex.quote(group)} {{}} + "
        f"-exec chmod {file_modes(dataset)} {{}} +",
        # Renamed into place by mv, not `rclone move` (which would delete a replaced file before
        # moving the new one, and costs an rclone start and a walk of both trees). A killed move
        # leaves the rest staged: the next run's dry run lists them, and the staging fetch keeps them.
        f"find {q_staging} -type d | sh -c {shlex.quote(MOVE_INTO_PLACE)} sh {q_dest} {q_staging}",
        f"find {q_staging} -mindepth 1 -depth -type d -empty -delete",
        f"rm -f {q_list}",
    ]
    if dataset.prune:
        listed = shlex.quote(f"{staging}.gone")
        commands += [
            # A list left by a killed run must not stand in for this one.
            f"rm -f {listed}",
            # check exits 1 when it finds files missing: the list, not the exit code, says which.
            f"rclone --config {shlex.quote(config)} --use-server-modtime --fast-list check {q_dest} "
            f'{shlex.quote(bucket)} --one-way --size-only --missing-on-dst {listed} >"$log" 2>&1 || true',
            f'test -f {listed} || {{ echo {failed} "?): cannot list what the bucket no longer has" >&2; exit 1; }}',
            "run " + rclone(config, "delete", dest, "--files-from-raw", f"{staging}.gone", "--rmdirs"),
            f"rm -f {listed}",
        ]
    yield "; ".join(commands)


def _copy_list(copies: list[str] | None, config: str, bucket: str, dest: str, q_list: str) -> list[str]:
    """Commands that write the staging fetch's list: the dry run's copies, or a dry run again.

    The fact's list is written out when it fits in a command line comfortably (the common
    case: a few changed objects); a longer one is listed again on the host.
    """
    if copies is not None and sum(len(path) + 3 for path in copies) <= INLINE_LIST_BYTES:
        if not copies:
            return [f": > {q_list}"]
        return [f"printf '%s\\n' {' '.join(shlex.quote(path) for path in copies)} > {q_list}"]
    return [
        "run " + rclone(config, "copy", bucket, dest, "--dry-run"),
        f'sed -n {shlex.quote(SKIPPED_COPY_SED)} "$log" > {q_list}',
    ]


def config_paths(datasets: list[Dataset]) -> list[str]:
    """What write_configs writes, for the datasets step's planning read (PathStates, with sha1 for the files)."""
    return [CONFIG_DIR, *(config_path(d) for d in datasets)] if datasets else []


def write_configs(datasets: list[Dataset], paths: dict[str, PathState]) -> None:
    """Put each dataset's rclone config on the host, 0600 root; a change of keys or endpoint rewrites it.

    + paths: the planning batch's PathStates of config_paths(datasets), which show them current
    """
    if not datasets:
        return
    unless_current(
        files.directory,
        current=path_is(paths, CONFIG_DIR, "directory", "root", "root", "700"),
        name="Create the directory of the S3 dataset keys",
        path=CONFIG_DIR,
        user="root",
        group="root",
        mode="700",
    )
    for dataset in datasets:
        path = config_path(dataset)
        unless_current(
            files.put,
            current=path_is(paths, path, "file", "root", "root", "600", config_sha1(dataset.source)),
            name=f"Write the S3 keys of dataset {dataset.name}",
            src=StringIO(rclone_config(dataset.source)),
            dest=config_path(dataset),
            user="root",
            group="root",
            mode="600",
        )
