"""Whether a local: dataset needs a sync, decided without walking the host's copy.

A dry run of rsync walks the host's whole tree on every deploy: at a million files that is
every host's disk read on every run, however little changed. Instead:

- the controller walks each local: source once per run (``planning.Run.once``, shared by
  every host that declares it) and reduces it to one digest: a sha256 over each entry's
  path, kind, size, modification time (ns) and mode, in a fixed order;
- each host keeps a record of what its last verified sync installed
  (``/var/lib/labfleet/datasets/<name>.record``: that digest, a digest of the settings that
  shape the sync, the manifest's sha256), written atomically only after the sync and its
  manifest check succeeded, and removed before a sync moves anything;
- the datasets step reads every record in its planning batch; a record equal to what this
  run would install, with the dataset directory present and its manifest stamp current,
  means nothing to do, and no rsync runs.

What this cannot see, by design: a change made by hand under a dataset on a host, and a
source file rewritten with the same size and modification time. ``./run status --verify``
compares every dataset with its source in full (rsync ``--checksum``) and reports both.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from collections.abc import Callable

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.files import FileContents

from labfleet import dataset_changes, dataset_listing, planning
from labfleet.dataset_walk import tree_listing
from labfleet.facts.datasets import RecordState, SyncRecord, parse_record, render_record

NO_MANIFEST = "-"
# The manifest field of a host: or s3: record: the controller cannot hash a manifest it does
# not hold, so the record asks for a stamp (a manifest check that passed since the last sync).
VERIFIED = "verified"


def file_sha256(path: str) -> str | None:
    """The hex sha256 of a file (what ``sha256sum`` prints), or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def settings_digest(src: str, dest: str, flags: list[str], manifest: str | None) -> str:
    """A digest of what shapes a sync besides the source's files: paths, rsync options, manifest name.

    The options carry prune (``--delete``), the owner and group, and the modes of a
    read-only or writable dataset; changing any of them makes the next run sync.
    """
    shape = {"src": src, "dest": dest, "flags": flags, "manifest": manifest}
    return "sha256:" + hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def wanted_record(src: str, dest: str, flags: list[str], manifest: str | None) -> SyncRecord | None:
    """The record a verified sync of src would leave now, or None when src cannot be walked.

    The walk (and the manifest's hash) is the controller's, once per run per source.
    """

    def make() -> tuple[str, str] | None:
        # Listed while pyinfra connected (labfleet.dataset_listing), else walked now.
        tree = dataset_listing.take(src)
        if tree is None:
            try:
                listing = tree_listing(src)
            except OSError:
                return None
            tree = "sha256:" + hashlib.sha256(listing).hexdigest()
            # Kept for the next run, whose push then sends only what changed (labfleet.dataset_changes).
            dataset_changes.remember(src, tree, listing)
        listed = file_sha256(posixpath.join(src, manifest)) if manifest else NO_MANIFEST
        return tree, listed or NO_MANIFEST

    walked = planning.current_run().once(f"dataset source {src} {manifest}", make)
    if walked is None:
        return None
    tree, listed = walked
    return SyncRecord(source=tree, settings=settings_digest(src, dest, flags, manifest), manifest=listed)


def is_current(found: RecordState | None, wanted: SyncRecord | None, directory_present: bool) -> bool:
    """Whether a host's copy needs no sync: its record equals what a sync would install now.

    + found: the host's record and manifest stamp (None: not read)
    + wanted: the record a sync would leave now (None: the source could not be walked)
    + directory_present: the dataset directory exists on the host

    A dataset with a manifest also needs its stamp to hold that manifest's sha256 (any
    stamp, for a host: or s3: record, whose manifest the controller cannot hash): a
    verification that failed, or that never ran since, is done again.
    """
    if found is None or wanted is None or not directory_present:
        return False
    if found["record"] != wanted:
        return False
    if wanted["manifest"] == VERIFIED:
        return found["stamp"] is not None
    return wanted["manifest"] == NO_MANIFEST or found["stamp"] == wanted["manifest"]


def record_path(state_dir: str, name: str) -> str:
    return posixpath.join(state_dir, f"{name}.record")


@operation(is_idempotent=True)
def record_sync(path: str, record: SyncRecord | Callable[[], SyncRecord | None]):
    """Write the record of a verified sync, atomically (a new file renamed over the old one).

    + path: the record file
    + record: what the sync installed (``wanted_record``), or a function that says it when
      the operation runs (an s3: bucket first listed while the run executes); None: unknown,
      nothing is written and the next run syncs again

    Planned after the sync and its manifest check, so it runs only when both succeeded. It
    reads the record when it runs: a dataset shown current is planned too once anything
    before it changed the host (labfleet.planning.unless_current), and must not rewrite it.

    **Example:**

    .. code:: python

        record_sync(name="Record the sync of mnist", path="/var/lib/labfleet/datasets/mnist.record",
                    record=wanted_record(src, dest, flags, "SHA256SUMS"))
    """
    written = record() if callable(record) else record
    if written is None:
        host.noop(f"{path}: what the source holds is not known, so no record is written")
        return
    if parse_record(host.get_fact(FileContents, path=path) or []) == written:
        host.noop(f"{path} already records this sync")
        return
    new = f"{path}.new"
    yield (
        f"install -d -m 0755 {shlex.quote(posixpath.dirname(path))} && "
        f"printf %s {shlex.quote(render_record(written))} > {shlex.quote(new)} && mv -f {shlex.quote(new)} "
        f"{shlex.quote(path)}"
    )
