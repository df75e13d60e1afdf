"""The controller's archive cache: what a prune removes and what it must leave."""

from __future__ import annotations

import os

from labfleet import archive_cache


def _cache_file(directory, name: str, age: float, now: float) -> None:
    path = directory / name
    path.write_bytes(b"x")
    os.utime(path, (now - age, now - age))


def test_old_archives_are_pruned_after_a_new_one_is_written_but_not_ones_in_use(tmp_path):
    now, hour = 1_000_000_000.0, 3600.0
    ids = [f"{n:x}" * 16 for n in range(1, 9)]  # eight images, 1 the newest used, 8 the oldest
    for n, key in enumerate(ids, start=1):
        _cache_file(tmp_path, f"{key}.tar.zst", n * 3 * hour, now)
        _cache_file(tmp_path, f"{key}.index.json", n * 3 * hour, now)
        _cache_file(tmp_path, f"{key}-above-3.tar.zst", n * 3 * hour, now)
    gone_from_engine = "a" * 16
    _cache_file(tmp_path, f"{gone_from_engine}-gzip.tar.gz", 3 * hour, now)
    # Another deploy writing the archive of an image that is not among the kept ones, right now.
    writing = "b" * 16
    _cache_file(tmp_path, f".{writing}.tar.zst.k2j3.partial", 60, now)
    dead_partial = f".{ids[0]}-above-2.tar.zst.x8f1.partial"  # a killed deploy's, hours old
    _cache_file(tmp_path, dead_partial, 5 * hour, now)
    _cache_file(tmp_path, "README", 100 * hour, now)  # not the cache's: left alone
    new = tmp_path / ("c" * 16 + ".tar.zst")
    _cache_file(tmp_path, new.name, 0, now)
    engine = {"sha256:" + key + "0" * 48 for key in [*ids, "c" * 16]}

    removed = archive_cache.prune(tmp_path, engine, keep=new, now=now)

    left = sorted(path.name for path in tmp_path.iterdir())
    # The new one and the 4 most recently used images the engine has, each with index and partials.
    assert new.name in left
    for key in ids[: archive_cache.KEEP_ARCHIVES - 1]:
        assert f"{key}.tar.zst" in left and f"{key}.index.json" in left and f"{key}-above-3.tar.zst" in left
    for key in ids[archive_cache.KEEP_ARCHIVES - 1 :]:
        assert not [name for name in left if name.startswith(key)], left
    assert f"{gone_from_engine}-gzip.tar.gz" not in left
    assert f".{writing}.tar.zst.k2j3.partial" in left, "a partial another deploy is writing was removed"
    assert dead_partial not in left and "README" in left
    assert len(removed) == 3 * (len(ids) - archive_cache.KEEP_ARCHIVES + 1) + 2
    # Where the engine cannot be asked nothing goes.
    assert archive_cache.prune(tmp_path, None, keep=new, now=now + 100 * hour) == []


def test_an_archive_used_within_the_grace_stays_even_beyond_the_count(tmp_path):
    now = 1_000_000_000.0
    ids = [f"{n:x}" * 16 for n in range(1, 8)]
    for n, key in enumerate(ids):
        _cache_file(tmp_path, f"{key}.tar.zst", n, now)  # all used in the last seconds
    new = tmp_path / f"{ids[0]}.tar.zst"
    assert archive_cache.prune(tmp_path, {f"sha256:{key}" for key in ids}, keep=new, now=now) == []
