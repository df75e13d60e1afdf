"""labfleet/dataset_upstream.py: host: and s3: datasets skip their sync on an equal record.

The listing of a bucket is one digest per source per run; a pull's record names its peer's
copy. The cases that must not be skipped are each a test: a changed peer copy (its source,
its settings), a new or changed object, a host record missing or from another source or
settings, the dataset directory gone, a peer this run cannot vouch for.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from labfleet import dataset_records, dataset_upstream, datasets_s3, planning
from labfleet.facts.datasets import BucketListing, parse_bucket_listing
from labfleet.settings import build

LISTING = "sha256:" + "1" * 64


class Peer(SimpleNamespace):
    __hash__ = object.__hash__


class RunState(SimpleNamespace):
    """pyinfra's State: hashable and weakly referenced, as planning keys one Run by it."""

    __hash__ = object.__hash__


class Fleet:
    """pyinfra's `host`, its inventory and its state for several hosts: a bucket listing per host."""

    def __init__(self, names, listings=None, executing=False, inactive=()):
        self.hosts = {name: Peer(name=name, asked=0) for name in names}
        self.listings = listings or {}
        for one in self.hosts.values():
            one.get_fact = self._fact_of(one)
        self.state = RunState(
            is_executing=executing,
            activated_hosts={h for n, h in self.hosts.items() if n not in inactive},
            failed_hosts=set(),
        )
        self.inventory = SimpleNamespace(get_host=lambda name: self.hosts[name])
        self.name = names[0]

    def __hash__(self) -> int:
        return id(self)

    def _fact_of(self, one):
        def get_fact(fact, **kwargs):
            assert fact is BucketListing and kwargs["command"].startswith("rclone --config /etc/labfleet/dataset-s3/")
            one.asked += 1
            digest = self.listings.get(one.name)
            return {"rc": 0 if digest else 3, "digest": digest, "error": ""}

        return get_fact


@pytest.fixture
def fleet(monkeypatch):
    def install(names, **kwargs):
        state_holder = Fleet(names, **kwargs)
        # One Run per state: the fake's state is its own, so each test starts a new run.
        monkeypatch.setattr(dataset_upstream, "host", state_holder)
        monkeypatch.setattr(planning, "host", state_holder)
        return state_holder

    return install


def _settings(raw, tmp_path, specs: dict[str, dict]) -> dict:
    keys = tmp_path / "keys.ini"
    keys.write_text("[default]\naws_access_key_id = AKIAX\naws_secret_access_key = secret\n")
    out = {}
    for name, datasets in specs.items():
        for spec in datasets.values():
            if isinstance(spec, dict) and "s3_endpoint" in spec:
                spec["s3_credentials_file"] = str(keys)
        out[name] = build(name, {**raw, "datasets": datasets, "lan_address": f"10.0.0.{len(out) + 1}"})
    return out


def _s3(**extra) -> dict:
    return {"source": "s3:lab-data/train", "s3_endpoint": "https://s3.lab:9000", **extra}


def test_the_listing_is_sorted_and_hashed_on_the_host_and_a_failure_has_no_digest(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "rclone"
    fake.write_text("#!/bin/sh\nprintf 'b.bin;7;2026-12-02 12:00:00\\na/c.bin;3;2026-12-02 12:00:01\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    command = BucketListing().command(datasets_s3.listing_command("/etc/x.conf", _source()))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, check=True).stdout
    sorted_lines = "a/c.bin;3;2026-12-02 12:00:01\nb.bin;7;2026-12-02 12:00:00\n"
    assert parse_bucket_listing(out.splitlines()) == {
        "rc": 0,
        "digest": "sha256:" + hashlib.sha256(sorted_lines.encode()).hexdigest(),
        "error": "",
    }
    fake.write_text("#!/bin/sh\necho '2026/12/02 12:00:00 ERROR : : error listing: directory not found' >&2\nexit 3\n")
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, check=True).stdout
    assert parse_bucket_listing(out.splitlines()) == {
        "rc": 3,
        "digest": None,
        "error": "ERROR : : error listing: directory not found",
    }


def _source():
    from labfleet.model import dataset_source

    return dataset_source("s3:lab-data/train")


def test_one_listing_per_source_per_run_from_the_first_host_that_can_list(raw, tmp_path, fleet):
    names = ["pc01", "pc02", "pc03", "pc04"]
    all_settings = _settings(raw, tmp_path, {name: {"train": _s3()} for name in names})
    # pc01 is new (no keys yet): passed over; pc02 lists, for every host, once.
    fake = fleet(names, listings={"pc02": LISTING, "pc03": LISTING})
    records = [dataset_upstream.wanted(all_settings, name, all_settings[name].datasets[0]) for name in names]
    assert {record["source"] for record in records if record} == {LISTING} and None not in records
    assert [fake.hosts[name].asked for name in names] == [1, 1, 0, 0]

    # No host of the first LISTERS can list: no record, so every host syncs (its dry run decides).
    fake = fleet(names, listings={"pc04": LISTING})
    assert dataset_upstream.wanted(all_settings, "pc04", all_settings["pc04"].datasets[0]) is None
    assert [fake.hosts[name].asked for name in names] == [1, 1, 1, 0]


def test_a_listing_planning_could_not_take_is_taken_once_while_the_run_executes(raw, tmp_path, fleet):
    names = ["pc01", "pc02"]
    all_settings = _settings(raw, tmp_path, {name: {"train": _s3()} for name in names})
    fake = fleet(names)
    assert dataset_upstream.wanted(all_settings, "pc01", all_settings["pc01"].datasets[0]) is None
    # The keys are written; the first sync takes the listing before it fetches; the records reuse it.
    fake.listings = {"pc01": LISTING, "pc02": LISTING}
    fake.state.is_executing = True
    take = dataset_upstream.later(all_settings, "pc02", all_settings["pc02"].datasets[0])
    first = take()
    assert first is not None and first["source"] == LISTING
    fake.listings = {"pc01": "sha256:" + "2" * 64}
    assert dataset_upstream.later(all_settings, "pc01", all_settings["pc01"].datasets[0])()["source"] == LISTING
    assert fake.hosts["pc01"].asked == 2 and fake.hosts["pc02"].asked == 1


@pytest.mark.parametrize(
    "change",
    ["prune", "readonly", "endpoint", "manifest", "bucket"],
)
def test_an_s3_record_changes_with_what_shapes_the_sync(raw, tmp_path, fleet, change):
    base = _settings(raw, tmp_path, {"pc01": {"train": _s3()}})
    changed_spec = {
        "prune": _s3(prune=True),
        "readonly": _s3(readonly=False),
        "endpoint": {**_s3(), "s3_endpoint": "https://other.lab:9000"},
        "manifest": _s3(manifest="SHA256SUMS"),
        "bucket": {**_s3(), "source": "s3:lab-data/val"},
    }[change]
    other = _settings(raw, tmp_path, {"pc01": {"train": changed_spec}})
    fleet(["pc01"], listings={"pc01": LISTING})
    before = dataset_upstream.wanted(base, "pc01", base["pc01"].datasets[0])
    after = dataset_upstream.wanted(other, "pc01", other["pc01"].datasets[0])
    assert before is not None and after is not None and before != after


def test_a_new_or_changed_object_changes_the_record(raw, tmp_path, fleet):
    all_settings = _settings(raw, tmp_path, {"pc01": {"train": _s3(manifest="SHA256SUMS")}})
    fleet(["pc01"], listings={"pc01": LISTING})
    before = dataset_upstream.wanted(all_settings, "pc01", all_settings["pc01"].datasets[0])
    fleet(["pc01"], listings={"pc01": "sha256:" + "2" * 64})
    after = dataset_upstream.wanted(all_settings, "pc01", all_settings["pc01"].datasets[0])
    assert before and after and before["source"] != after["source"] and before["settings"] == after["settings"]
    # The controller cannot hash the bucket's manifest: the record asks for a stamp instead.
    assert after["manifest"] == dataset_records.VERIFIED
    present = {"record": after, "stamp": "3" * 64}
    assert dataset_records.is_current(present, after, True)
    assert not dataset_records.is_current({"record": after, "stamp": None}, after, True)
    assert not dataset_records.is_current({"record": before, "stamp": "3" * 64}, after, True)
    assert not dataset_records.is_current(present, after, False), "the dataset directory is gone"


# --- host: the peer's copy ---------------------------------------------------------------------


def _tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    for name in ("a.bin", "d/b.bin"):
        (root / name).write_bytes(name.encode())
        os.utime(root / name, ns=(1_700_000_000_000_000_000,) * 2)
    return root


def _chain(raw, tmp_path, source: Path, peer_spec=None, puller_spec=None) -> dict:
    return _settings(
        raw,
        tmp_path,
        {
            "pc01": {"ref": peer_spec or f"local:{source}"},
            "pc02": {"ref": puller_spec or "host:pc01:/srv/datasets/ref"},
            "pc03": {"ref": "host:pc02:/srv/datasets/ref"},
        },
    )


def test_a_pull_records_its_peers_copy_and_a_changed_peer_copy_changes_it(raw, tmp_path, fleet):
    source = _tree(tmp_path / "ref")
    all_settings = _chain(raw, tmp_path, source)
    hosts = ["pc01", "pc02", "pc03"]
    fleet(hosts)
    first = {name: dataset_upstream.wanted(all_settings, name, all_settings[name].datasets[0]) for name in hosts}
    assert None not in first.values() and len({r["source"] for r in first.values()}) == 3

    # The source on the controller changes: the peer's copy will, so both pulls (hop 1 and 2) run.
    os.utime(source / "a.bin", ns=(1_700_000_001_000_000_000,) * 2)
    fleet(hosts)
    second = {name: dataset_upstream.wanted(all_settings, name, all_settings[name].datasets[0]) for name in hosts}
    assert all(second[name]["source"] != first[name]["source"] for name in hosts)
    assert second["pc02"]["settings"] == first["pc02"]["settings"]

    # The peer's settings change (prune): its copy may lose files, so the pull runs again.
    pruned = _chain(raw, tmp_path, source, peer_spec={"source": f"local:{source}", "prune": True})
    fleet(hosts)
    third = dataset_upstream.wanted(pruned, "pc02", pruned["pc02"].datasets[0])
    assert third is not None and third["source"] != second["pc02"]["source"]

    # The puller's own settings (its source text, prune) are in its settings digest.
    own = _chain(raw, tmp_path, source, puller_spec={"source": "host:pc01:/srv/datasets/ref", "prune": True})
    fleet(hosts)
    fourth = dataset_upstream.wanted(own, "pc02", own["pc02"].datasets[0])
    assert fourth is not None and fourth["source"] == second["pc02"]["source"]
    assert fourth["settings"] != second["pc02"]["settings"]


def test_a_pull_from_a_peer_of_another_name_is_another_source(raw, tmp_path, fleet):
    source = _tree(tmp_path / "ref")
    specs = {
        "pc01": {"ref": f"local:{source}"},
        "pc02": {"ref": f"local:{source}"},
        "pc03": {"ref": "host:pc01:/srv/datasets/ref"},
    }
    all_settings = _settings(raw, tmp_path, specs)
    moved = _settings(raw, tmp_path, {**specs, "pc03": {"ref": "host:pc02:/srv/datasets/ref"}})
    fleet(["pc01", "pc02", "pc03"])
    from_pc01 = dataset_upstream.wanted(all_settings, "pc03", all_settings["pc03"].datasets[0])
    from_pc02 = dataset_upstream.wanted(moved, "pc03", moved["pc03"].datasets[0])
    assert from_pc01 and from_pc02 and from_pc01["source"] != from_pc02["source"]


@pytest.mark.parametrize("case", ["not a dataset of the peer", "manual peer", "peer outside this run"])
def test_a_pull_without_a_known_peer_copy_has_no_record_so_its_dry_run_decides(raw, tmp_path, fleet, case):
    source = _tree(tmp_path / "ref")
    peer = {"ref": "manual"} if case == "manual peer" else {"ref": f"local:{source}"}
    path = "/srv/other" if case == "not a dataset of the peer" else "/srv/datasets/ref"
    all_settings = _settings(raw, tmp_path, {"pc01": peer, "pc02": {"ref": f"host:pc01:{path}"}})
    fleet(["pc01", "pc02"], inactive=("pc01",) if case == "peer outside this run" else ())
    assert dataset_upstream.wanted(all_settings, "pc02", all_settings["pc02"].datasets[0]) is None


def test_only_a_pull_whose_peers_lead_to_a_local_or_s3_source_is_recorded(raw, tmp_path, fleet):
    source = _tree(tmp_path / "ref")
    all_settings = _settings(
        raw,
        tmp_path,
        {
            "pc01": {"ref": f"local:{source}", "notes": "manual"},
            "pc02": {"ref": "host:pc01:/srv/datasets/ref", "notes": "host:pc01:/srv/datasets/notes"},
            "pc03": {"ref": "host:pc02:/srv/datasets/ref", "gone": "host:pc01:/srv/nowhere"},
        },
    )
    fleet(["pc01", "pc02", "pc03"])
    found = {
        (name, d.name): dataset_upstream.recordable(all_settings, name, d)
        for name, settings in all_settings.items()
        for d in settings.datasets
    }
    assert found == {
        ("pc01", "ref"): True,
        ("pc01", "notes"): False,
        ("pc02", "ref"): True,
        ("pc02", "notes"): False,
        ("pc03", "ref"): True,
        ("pc03", "gone"): False,
    }
