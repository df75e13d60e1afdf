"""Facts about datasets: default ACLs, rsync and rclone dry runs, manifests, sync records (labfleet.datasets)."""

from __future__ import annotations

import re
import shlex
from typing import TypedDict

from pyinfra.api import FactBase


class DefaultAcls(FactBase):
    """The default ACLs of some directories, as getfacl prints them without header or comments.

    + paths: the directories

    Returns ``{path: entries}`` for the paths that are directories, entries a tuple such as
    ``("user::rwx", "group::r-x", "other::r-x")`` (empty when the directory has none). One
    command for all of them: the datasets step reads the root and every dataset at once.
    """

    MARK = "labfleet-acl-of "

    def requires_command(self, *args, **kwargs) -> str:
        return "getfacl"

    @staticmethod
    def default():
        return {}

    def command(self, paths: tuple[str, ...]) -> str:
        if not paths:
            return "true"
        listed = " ".join(shlex.quote(path) for path in paths)
        return (
            f'for p in {listed}; do if [ -d "$p" ]; then echo "{self.MARK}$p"; '
            'getfacl --absolute-names --omit-header --default "$p"; fi; done; true'
        )

    def process(self, output):
        acls: dict[str, tuple[str, ...]] = {}
        current = None
        for line in output:
            if line.startswith(self.MARK):
                current = line[len(self.MARK) :]
                acls[current] = ()
            elif current is not None and line.strip() and not line.startswith("#"):
                acls[current] = (*acls[current], line.strip().removeprefix("default:"))
        return acls


class RsyncDryRun(FactBase):
    """What an rsync would transfer: runs the given rsync command line with --dry-run.

    + command: an rsync command line that has --itemize-changes, without --dry-run

    Returns ``{"rc": int, "changes": [itemized lines], "errors": [other lines]}``. The command
    never fails the fact: a peer that cannot be reached is the caller's to report.
    """

    def command(self, command: str) -> str:
        return f'{command} --dry-run 2>&1; echo "labfleet-rc=$?"'

    def process(self, output):
        return parse_rsync_itemized(list(output))


def parse_rsync_itemized(lines) -> dict:
    """Split rsync --itemize-changes output (with a final ``labfleet-rc=N``) into changes and errors."""
    rc, changes, errors = 0, [], []
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
        elif _ITEMIZED.match(line):
            changes.append(line)
        elif line.strip():
            errors.append(line)
    return {"rc": rc, "changes": changes, "errors": errors}


# rsync's itemized lines: "YXcstpoguax path" (Y is <, >, c, h, . or *), e.g. ">f+++++++++ a/b",
# "cd+++++++++ a/", ".f...p..... x", "*deleting   old".
_ITEMIZED = re.compile(r"^([<>ch.][fdLDS][.+?cstpoguaxn ]{9,} |\*deleting +)\S")


class ManifestState(FactBase):
    """The sha256 of a dataset's manifest and the stamp of its last successful verification.

    Returns ``{"manifest": sha256 | None, "stamp": str | None}``.
    """

    def command(self, manifest: str, stamp: str) -> str:
        return (
            f"echo manifest $(sha256sum < {shlex.quote(manifest)} 2>/dev/null | cut -d' ' -f1); "
            f"echo stamp $(cat {shlex.quote(stamp)} 2>/dev/null)"
        )

    def process(self, output):
        state = {"manifest": None, "stamp": None}
        for line in output:
            key, _, value = line.strip().partition(" ")
            if key in state and value.strip():
                state[key] = value.strip()
        return state


class RcloneDryRun(FactBase):
    """What an rclone copy or sync would change: runs the given rclone command line with --dry-run.

    + command: an rclone copy or sync command line, without --dry-run

    Returns ``{"rc": int, "changes": [paths to copy or delete], "copies": [paths to copy],
    "error": str}``, error being rclone's last error line ("" when none). The command never
    fails the fact: a bucket that cannot be read is the caller's to report.
    """

    def command(self, command: str) -> str:
        return f'{command} --dry-run 2>&1; echo "labfleet-rc=$?"'

    def process(self, output):
        return parse_rclone_dry_run(list(output))


def parse_rclone_dry_run(lines) -> dict:
    """Split rclone --dry-run output (with a final ``labfleet-rc=N``) into what would change and the last error.

    A file that only needs its time set (rclone found its bytes equal by hash) is not a change:
    its content is already the object's.
    """
    rc, changes, copies, error = 0, [], [], ""
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
            continue
        skipped = _RCLONE_SKIPPED.search(line)
        if skipped and skipped["action"] in ("copy", "delete"):
            changes.append(skipped["path"])
            if skipped["action"] == "copy":
                copies.append(skipped["path"])
        elif _RCLONE_ERROR.search(line):
            error = _RCLONE_PREFIX.sub("", line.strip())[:500]
    return {"rc": rc, "changes": changes, "copies": copies, "error": error}


# rclone's log lines: "2026/12/02 12:15:51 NOTICE: d0/f2.bin: Skipped copy as --dry-run is set (size 7)".
_RCLONE_SKIPPED = re.compile(r"NOTICE: (?P<path>.+): Skipped (?P<action>[a-z ]+?) as --dry-run is set")
_RCLONE_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Failed to ")
_RCLONE_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


class RcloneCheck(FactBase):
    """What differs between a bucket and a host's copy: runs the given ``rclone check`` with ``--combined -``.

    + command: an rclone check command line (bucket first, then the directory)

    Returns ``{"rc": int, "changes": [], "paths": [paths that differ], "extra": [paths only on the
    host], "errors": [last error line], "tool": "rclone"}``, the shape of RsyncDryRun's result:
    rc 0 when the check ran, whatever it found.
    """

    def command(self, command: str) -> str:
        return (
            f'e=$(mktemp) && {{ {command} --combined - 2>"$e"; echo "labfleet-rc=$?"; '
            'grep -E "ERROR|CRITICAL|Failed" "$e" | grep -v -E ": (sizes|md5) differ|not in |differences found" '
            '| tail -n 1; rm -f "$e"; }'
        )

    def process(self, output):
        return parse_rclone_check(list(output))


def parse_rclone_check(lines) -> dict:
    """rclone check's combined list: ``-`` missing here, ``*`` differs, ``!`` unreadable (paths);
    ``+`` only here (extra: what a sync with prune deletes)."""
    rc, paths, extra, errors, listed = 0, [], [], [], False
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
        elif len(line) > 2 and line[0] in "=-+*!" and line[1] == " ":
            listed = True
            if line[0] in "-*!":
                paths.append(line[2:])
            elif line[0] == "+":
                extra.append(line[2:])
        elif line.strip():
            errors.append(_RCLONE_PREFIX.sub("", line.strip()))
    # check exits 1 when it finds a difference: that is a result, not a failure.
    if rc == 1 and listed and not errors:
        rc = 0
    return {"rc": rc, "changes": [], "paths": paths, "extra": extra, "errors": errors, "tool": "rclone"}


class BucketListing(FactBase):
    """One digest of a bucket's listing: rclone's path, size and time of every object, sorted, hashed on the host.

    + command: an rclone ``lsf`` command line (labfleet.datasets_s3.listing_command)

    Returns ``{"rc": int, "digest": "sha256:..." | None, "error": str}``: only the digest
    crosses the link, however many objects the bucket holds. The command never fails the
    fact: a host without the keys or the tool yet is the caller's to pass over.
    """

    @staticmethod
    def default():
        return {"rc": -1, "digest": None, "error": ""}

    def command(self, command: str) -> str:
        # dash has no pipefail: the listing's own exit status goes to a file beside its log.
        return (
            f'e=$(mktemp) && d=$( {{ {command} 2>"$e"; echo $? > "$e.rc"; }} | LC_ALL=C sort | sha256sum '
            '| cut -d" " -f1 ); echo "rc $(cat "$e.rc")"; echo "digest $d"; '
            'echo "error $(grep -E "ERROR|CRITICAL|Failed" "$e" | tail -n 1 | cut -c1-300)"; rm -f "$e" "$e.rc"'
        )

    def process(self, output):
        return parse_bucket_listing(list(output))


def parse_bucket_listing(lines) -> dict:
    """BucketListing's output (``rc N``, ``digest HEX``, ``error LINE``) as its result."""
    found = {"rc": -1, "digest": None, "error": ""}
    for line in lines:
        key, _, value = line.strip().partition(" ")
        if key == "rc" and value.strip().lstrip("-").isdigit():
            found["rc"] = int(value)
        elif key == "digest" and re.fullmatch(r"[0-9a-f]{64}", value.strip()):
            found["digest"] = "sha256:" + value.strip()
        elif key == "error":
            found["error"] = _RCLONE_PREFIX.sub("", value.strip())
    if found["rc"] != 0:
        found["digest"] = None
    return found


# --- What a host's last verified sync of a local: dataset installed (labfleet.dataset_records) ---

RECORD_HEADER = "labfleet-dataset-record 1"
RECORD_KEYS = ("source", "settings", "manifest")


class SyncRecord(TypedDict):
    """What one verified sync installed: the source tree's digest, the digest of the settings
    that shaped the sync, and the sha256 of the manifest that passed ("-" without one)."""

    source: str
    settings: str
    manifest: str


class RecordState(TypedDict):
    record: SyncRecord | None
    stamp: str | None


def render_record(record: SyncRecord) -> str:
    """The record file's text: a header, one ``key value`` line per field, and ``end``."""
    fields = {"source": record["source"], "settings": record["settings"], "manifest": record["manifest"]}
    return "".join([f"{RECORD_HEADER}\n", *(f"{key} {fields[key]}\n" for key in RECORD_KEYS), "end\n"])


def parse_record(lines) -> SyncRecord | None:
    """A record file's lines as a SyncRecord; None for anything but a whole record of this version.

    A record cut short (no ``end``), of another version, with a field missing, repeated or
    malformed counts as no record: the sync then runs, as it does where none was ever written.
    """
    lines = [line.strip() for line in lines if line.strip()]
    if not lines or lines[0] != RECORD_HEADER or lines[-1] != "end":
        return None
    fields = {}
    for line in lines[1:-1]:
        key, _, value = line.partition(" ")
        if key not in RECORD_KEYS or key in fields or not value or " " in value:
            return None
        fields[key] = value
    if set(fields) != set(RECORD_KEYS):
        return None
    return SyncRecord(source=fields["source"], settings=fields["settings"], manifest=fields["manifest"])


class DatasetRecords(FactBase):
    """Per dataset, the record of its last verified sync and its manifest stamp: one ``cat`` each.

    + entries: ``(name, record path, stamp path)`` per dataset

    Returns ``{name: {"record": SyncRecord | None, "stamp": sha256 | None}}`` for every entry.
    """

    MARK = "labfleet-record-of "
    STAMP = "labfleet-stamp-of "

    @staticmethod
    def default():
        return {}

    def command(self, entries) -> str:
        parts = []
        for name, record, stamp in entries:
            parts.append(
                f"echo {shlex.quote(self.MARK + name)}; cat {shlex.quote(record)} 2>/dev/null; echo; "
                f"echo {shlex.quote(self.STAMP + name)}; cat {shlex.quote(stamp)} 2>/dev/null; echo"
            )
        return "; ".join([*parts, "true"])

    def process(self, output):
        sections: dict[tuple[str, str], list[str]] = {}
        current: list[str] | None = None
        for line in output:
            for kind, mark in (("record", self.MARK), ("stamp", self.STAMP)):
                if line.startswith(mark):
                    current = sections.setdefault((kind, line[len(mark) :].strip()), [])
                    break
            else:
                if current is not None:
                    current.append(line)
        names = dict.fromkeys(name for _, name in sections)
        found: dict[str, RecordState] = {}
        for name in names:
            stamp = [line.strip() for line in sections.get(("stamp", name), []) if line.strip()]
            found[name] = RecordState(
                record=parse_record(sections.get(("record", name), [])),
                stamp=stamp[0] if len(stamp) == 1 and " " not in stamp[0] else None,
            )
        return found
