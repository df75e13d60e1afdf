"""labfleet/dataset_records.py: the source's digest, the host's record, and the decision to sync.

The cases that must not be skipped are each one test row: the source changed, the settings
changed, no record (or one cut short), a manifest that has not passed since, the dataset
directory gone.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pyinfra.facts.deb import DebPackages

from labfleet import dataset_pull, dataset_push, dataset_records, dataset_rsync, dataset_state, dataset_walk, planning
from labfleet.facts.datasets import DatasetRecords, DefaultAcls, SyncRecord, parse_record, render_record
from labfleet.facts.system import Accounts, GroupMembers, PathStates

TIME = 1_700_000_000_123_456_789


def _tree(root: Path, names: list[str]) -> Path:
    """Files with fixed contents, times and modes, created in the order given."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        path.chmod(0o644)
        os.utime(path, ns=(TIME, TIME))
    return root


NAMES = ["a.bin", "d1/b.bin", "d1/s/c.bin", "d2/e f.bin"]


def test_the_digest_does_not_depend_on_the_order_files_were_made(tmp_path):
    first = _tree(tmp_path / "one", NAMES)
    second = _tree(tmp_path / "two", list(reversed(NAMES)))
    digest = dataset_walk.tree_digest(str(first))
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert dataset_walk.tree_digest(str(second)) == digest
    assert dataset_walk.tree_digest(str(first)) == digest


@pytest.mark.parametrize(
    "change",
    [
        "size",
        "mtime",
        "mode",
        "new file",
        "removed file",
        "new empty directory",
        "directory mode",
        "renamed file",
        "symlink target",
    ],
)
def test_the_digest_changes_with_what_a_sync_would_move(tmp_path, change):
    root = _tree(tmp_path / "src", NAMES)
    (root / "link").symlink_to("a.bin")
    before = dataset_walk.tree_digest(str(root))
    target = root / "d1" / "b.bin"
    if change == "size":
        target.write_bytes(b"longer than before")
        os.utime(target, ns=(TIME, TIME))
    elif change == "mtime":
        os.utime(target, ns=(TIME + 1, TIME + 1))
    elif change == "mode":
        target.chmod(0o755)
    elif change == "new file":
        _tree(root, ["d2/new.bin"])
    elif change == "removed file":
        target.unlink()
    elif change == "new empty directory":
        (root / "d3").mkdir()
    elif change == "directory mode":
        (root / "d1").chmod(0o700)
    elif change == "renamed file":
        target.rename(root / "d1" / "c.bin")
    elif change == "symlink target":
        (root / "link").unlink()
        (root / "link").symlink_to("d1/b.bin")
    assert dataset_walk.tree_digest(str(root)) != before, change


def test_the_digest_ignores_what_rsync_does_not_send_and_directory_times(tmp_path):
    root = _tree(tmp_path / "src", NAMES)
    before = dataset_walk.tree_digest(str(root))
    os.mkfifo(root / "d1" / "pipe")  # rsync skips special files without --specials
    os.utime(root / "d1", ns=(TIME + 5, TIME + 5))  # the syncs leave directory times alone
    assert dataset_walk.tree_digest(str(root)) == before


def test_find_and_the_python_walk_give_the_same_digest(tmp_path, monkeypatch):
    """GNU find lists the tree where it can; a controller without it walks in Python, to the same digest."""
    root = _tree(tmp_path / "src", [*NAMES, "odd/new\nline.bin", "odd/sp ace/x.bin"])
    (root / "link").symlink_to("d1/b.bin")
    os.mkfifo(root / "pipe")
    (root / "d2").chmod(0o2755)
    os.utime(root / "a.bin", ns=(TIME, 1_700_000_000_000_000_007))
    found = dataset_walk.tree_digest(str(root))
    assert dataset_walk._found(str(root)) is not None, "find did not list the tree here"

    def no_find(*args, **kwargs):
        raise FileNotFoundError("find")

    monkeypatch.setattr(dataset_walk.subprocess, "run", no_find)
    assert dataset_walk.tree_digest(str(root)) == found
    with pytest.raises(OSError):
        dataset_walk.tree_digest(str(tmp_path / "gone"))


def test_an_unreadable_source_has_no_record_so_the_sync_runs_and_rsync_reports(tmp_path, planning_host):
    planning_host({})
    missing = str(tmp_path / "gone")
    assert dataset_records.wanted_record(missing, "/srv/datasets/x", [], None) is None
    assert not dataset_records.is_current({"record": None, "stamp": None}, None, True)


def test_each_source_is_walked_once_per_run_whatever_the_number_of_hosts(tmp_path, planning_host, monkeypatch):
    root = _tree(tmp_path / "src", [*NAMES, "SHA256SUMS"])
    planning_host({})
    walks = []
    real = dataset_records.tree_listing
    monkeypatch.setattr(dataset_records, "tree_listing", lambda path: walks.append(path) or real(path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    records = [
        dataset_records.wanted_record(str(root), f"/srv/datasets/{name}", ["--recursive"], "SHA256SUMS")
        for name in ("x", "x", "y")
    ]
    assert walks == [str(root)]
    assert records[0] == records[1] and records[0] is not None
    assert records[2] is not None and records[2]["source"] == records[0]["source"]
    assert records[2]["settings"] != records[0]["settings"], "another directory is another sync"
    assert records[0]["manifest"] == dataset_records.file_sha256(str(root / "SHA256SUMS"))


# --- the record file ----------------------------------------------------------------------------

RECORD = SyncRecord(source="sha256:" + "1" * 64, settings="sha256:" + "2" * 64, manifest="3" * 64)


def test_a_record_reads_back_as_written_and_anything_partial_is_no_record():
    text = render_record(RECORD)
    assert text.endswith("end\n")
    assert parse_record(text.splitlines()) == RECORD
    lines = text.splitlines()
    assert parse_record(lines[:-1]) is None, "cut short before end"
    assert parse_record(lines[:2] + lines[3:]) is None, "a field missing"
    assert parse_record(["labfleet-dataset-record 2", *lines[1:]]) is None, "another version"
    assert parse_record([]) is None
    assert parse_record([*lines[:-1], "source two words", "end"]) is None


def test_the_records_fact_reads_records_and_stamps_with_one_command(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "a.record").write_text(render_record(RECORD))
    (state / "a.verified").write_text("3" * 64 + "\n")
    (state / "b.record").write_text(render_record(RECORD)[:40])  # a write cut short
    entries = tuple(
        (name, str(state / f"{name}.record"), str(state / f"{name}.verified")) for name in ("a", "b", "c d")
    )
    command = DatasetRecords().command(entries)
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert DatasetRecords().process(output.splitlines()) == {
        "a": {"record": RECORD, "stamp": "3" * 64},
        "b": {"record": None, "stamp": None},
        "c d": {"record": None, "stamp": None},
    }
    assert DatasetRecords().command(()) == "true"


def test_writing_a_record_is_atomic_and_idempotent(tmp_path, fake_host_in):
    from pyinfra.facts.files import FileContents

    path = tmp_path / "state" / "m.record"
    fake_host_in(dataset_records, {FileContents: None})
    (command,) = list(dataset_records.record_sync._inner(path=str(path), record=RECORD))
    assert f"> {path}.new && mv -f {path}.new {path}" in command
    subprocess.run(["sh", "-c", command], check=True)
    assert parse_record(path.read_text().splitlines()) == RECORD
    # Planned again in a run that changed something else on the host: it rewrites nothing.
    fake = fake_host_in(dataset_records, {FileContents: path.read_text().splitlines()})
    assert list(dataset_records.record_sync._inner(path=str(path), record=RECORD)) == []
    assert fake.noops == [f"{path} already records this sync"]


def test_no_record_is_written_when_what_the_source_holds_is_not_known(tmp_path, fake_host_in):
    path = tmp_path / "m.record"
    fake = fake_host_in(dataset_records, {})
    assert list(dataset_records.record_sync._inner(path=str(path), record=lambda: None)) == []
    assert fake.noops == [f"{path}: what the source holds is not known, so no record is written"]


# --- the decision ------------------------------------------------------------------------------

NO_MANIFEST = SyncRecord(source=RECORD["source"], settings=RECORD["settings"], manifest="-")


@pytest.mark.parametrize(
    ("found", "wanted", "present", "current"),
    [
        ({"record": RECORD, "stamp": "3" * 64}, RECORD, True, True),
        ({"record": NO_MANIFEST, "stamp": None}, NO_MANIFEST, True, True),
        # the source changed
        ({"record": RECORD, "stamp": "3" * 64}, {**RECORD, "source": "sha256:" + "9" * 64}, True, False),
        # prune, readonly, the group or the paths changed
        ({"record": RECORD, "stamp": "3" * 64}, {**RECORD, "settings": "sha256:" + "9" * 64}, True, False),
        # the manifest changed
        ({"record": RECORD, "stamp": "3" * 64}, {**RECORD, "manifest": "9" * 64}, True, False),
        # no record: never synced by this labfleet, a sync that failed, or a record cut short
        ({"record": None, "stamp": "3" * 64}, RECORD, True, False),
        # the manifest has not passed since (a failed check removes the stamp)
        ({"record": RECORD, "stamp": None}, RECORD, True, False),
        ({"record": RECORD, "stamp": "4" * 64}, RECORD, True, False),
        # the dataset directory is gone
        ({"record": RECORD, "stamp": "3" * 64}, RECORD, False, False),
        # not read, or a source that cannot be walked
        (None, RECORD, True, False),
        ({"record": RECORD, "stamp": "3" * 64}, None, True, False),
    ],
)
def test_only_an_equal_record_of_a_verified_sync_skips_the_sync(found, wanted, present, current):
    assert dataset_records.is_current(found, wanted, present) is current


# --- the step: what it plans from the batch -----------------------------------------------------


def _readings(records, paths) -> dict:
    """The planning batch of a host whose datasets step has run before: these records and paths."""
    return {
        DebPackages: {},
        GroupMembers: {"exists": True, "members": [], "accounts": []},
        PathStates: paths,
        DefaultAcls: {},
        Accounts: {},
        DatasetRecords: records,
    }


def _plan_local(planning_host, monkeypatch, settings, records, paths):
    """Plan the local: pushes of pc01 from these readings; returns the names of the operations planned."""
    fake = planning_host(_readings(records, paths))
    planned = []

    def operation(**kwargs):
        fake.meta.ops += 1
        planned.append(kwargs["name"])

    monkeypatch.setattr(dataset_pull, "serves_peers", lambda name: False)
    patched = ((dataset_push, "push_datasets"), (dataset_push, "verify_manifest"), (dataset_records, "record_sync"))
    for module, name in patched:
        monkeypatch.setattr(module, name, operation)
    dataset_push._bring_in_local(settings, [d for d in settings.datasets if d.source.kind == "local"])
    return planned, fake


def test_the_step_plans_no_push_for_a_dataset_whose_record_matches(tmp_path, settings, planning_host, monkeypatch):
    source = _tree(tmp_path / "train", [*NAMES, "SHA256SUMS"])
    host_settings = settings(datasets={"train": {"source": f"local:{source}", "manifest": "SHA256SUMS"}})
    (dataset,) = host_settings.datasets
    dest = dataset_state.dataset_dir(host_settings, dataset)
    flags = dataset_rsync.rsync_flags(dataset, host_settings.datasets_group)
    planning_host({})
    wanted = dataset_records.wanted_record(str(source), dest, flags, "SHA256SUMS")
    assert wanted is not None
    present = {dest: {"kind": "directory", "user": "root", "group": "labdata", "mode": "2755", "sha1": None}}
    current = {"train": {"record": wanted, "stamp": wanted["manifest"]}}

    planned, fake = _plan_local(planning_host, monkeypatch, host_settings, current, present)
    assert planned == []
    assert fake.reads == [planning.FactBatch], "the records come with the planning batch"

    names = [
        "Push datasets from the controller",
        "Verify dataset train against SHA256SUMS",
        "Record the verified sync of dataset train",
    ]
    assert _plan_local(planning_host, monkeypatch, host_settings, current, {})[0] == names
    unverified = {"train": {"record": wanted, "stamp": None}}
    assert _plan_local(planning_host, monkeypatch, host_settings, unverified, present)[0] == names
    os.utime(source / "a.bin", ns=(TIME + 10**9, TIME + 10**9))
    assert _plan_local(planning_host, monkeypatch, host_settings, current, present)[0] == names


def test_a_push_after_a_recorded_sync_sends_only_what_changed(tmp_path, settings, planning_host, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = _tree(tmp_path / "train", NAMES)
    host_settings = settings(datasets={"train": f"local:{source}"})
    (dataset,) = host_settings.datasets
    dest = dataset_state.dataset_dir(host_settings, dataset)
    flags = dataset_rsync.rsync_flags(dataset, host_settings.datasets_group)
    planning_host({})
    recorded = dataset_records.wanted_record(str(source), dest, flags, None)
    assert recorded is not None
    os.utime(source / "d1" / "b.bin", ns=(TIME + 10**9, TIME + 10**9))
    present = {dest: {"kind": "directory", "user": "root", "group": "labdata", "mode": "2755", "sha1": None}}
    pushed = []

    def plan(records, paths):
        fake = planning_host(_readings(records, paths))

        def operation(**kwargs):
            fake.meta.ops += 1
            pushed.extend(kwargs.get("pushes", []))

        monkeypatch.setattr(dataset_pull, "serves_peers", lambda name: False)
        monkeypatch.setattr(dataset_push, "push_datasets", operation)
        monkeypatch.setattr(dataset_records, "record_sync", operation)
        dataset_push._bring_in_local(host_settings, list(host_settings.datasets))
        return pushed.pop()[-1]

    assert plan({"train": {"record": recorded, "stamp": None}}, present) == b"d1/b.bin\0"
    # Another record's settings, no record, no directory: the whole tree.
    other = {**recorded, "settings": "sha256:" + "9" * 64}
    assert plan({"train": {"record": other, "stamp": None}}, present) is None
    assert plan({"train": {"record": None, "stamp": None}}, present) is None
    assert plan({"train": {"record": recorded, "stamp": None}}, {}) is None
