"""labfleet/dataset_changes.py: a push sends only what changed since the host's record, when it can tell."""

from __future__ import annotations

import os

import pytest

from labfleet import dataset_changes, dataset_walk

TIME = 1_700_000_000_123_456_789


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write(root, name: str, body: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    os.utime(path, ns=(TIME, TIME))


def _listed(src) -> str:
    listing = dataset_walk.tree_listing(str(src))
    digest = dataset_walk.tree_digest(str(src))
    dataset_changes.remember(str(src), digest, listing)
    return digest


def test_only_new_and_changed_entries_are_sent(tmp_path):
    src = tmp_path / "src"
    for name in ("a.bin", "d1/b.bin", "d1/c.bin", "gone.bin"):
        _write(src, name, name.encode())
    old = _listed(src)
    _write(src, "d1/b.bin", b"other")  # changed
    _write(src, "d2/new.bin", b"new")  # new, in a new directory
    (src / "gone.bin").unlink()  # removed: without prune nothing is deleted
    new = _listed(src)
    assert dataset_changes.changed(str(src), old, new, prune=False) == b"d1/b.bin\0d2\0d2/new.bin\0"
    assert dataset_changes.changed(str(src), new, new, prune=False) == b""
    # With prune, what the host has and the source has not is deleted: only a whole sync walks for it.
    assert dataset_changes.changed(str(src), old, new, prune=True) is None


def test_a_listing_the_cache_lacks_or_that_does_not_match_its_name_means_a_whole_sync(tmp_path, cache):
    src = tmp_path / "src"
    _write(src, "a.bin", b"a")
    old = _listed(src)
    _write(src, "a.bin", b"b")
    new = _listed(src)
    assert dataset_changes.changed(str(src), "sha256:" + "0" * 64, new, prune=False) is None
    (stored,) = [p for p in cache.rglob("*.list") if p.name == old.removeprefix("sha256:") + ".list"]
    stored.write_bytes(b"a.bin\0f 9 1.0 644\0")
    assert dataset_changes.changed(str(src), old, new, prune=False) is None


def test_the_cache_keeps_the_last_listings_of_each_source(tmp_path, cache):
    src = tmp_path / "src"
    digests = []
    for index in range(dataset_changes.KEPT + 2):
        _write(src, "a.bin", b"x" * (index + 1))
        digests.append(_listed(src))
        for stored in cache.rglob("*.list"):
            os.utime(stored, ns=(TIME + index * 10**9, TIME + index * 10**9)) if stored.stem == digests[
                -1
            ].removeprefix("sha256:") else None
    kept = {p.stem for p in cache.rglob("*.list")}
    assert len(kept) == dataset_changes.KEPT
    assert digests[-1].removeprefix("sha256:") in kept and digests[0].removeprefix("sha256:") not in kept


def test_the_listings_of_a_source_unused_for_a_month_are_forgotten(tmp_path, cache):
    old_src, new_src = tmp_path / "old", tmp_path / "new"
    _write(old_src, "a.bin", b"a")
    _write(new_src, "b.bin", b"b")
    _listed(old_src)
    (stale,) = list(cache.rglob("*.list"))
    long_ago = TIME / 10**9  # November 2023
    os.utime(stale, (long_ago, long_ago))
    _listed(new_src)
    assert not stale.exists()
    assert len(list(cache.rglob("*.list"))) == 1
