"""labfleet/dataset_listing.py: local: sources are listed while pyinfra connects, and planning takes that listing."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_state

from labfleet import dataset_changes, dataset_listing, dataset_records, dataset_walk


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset_listing, "_started", {})


def _tree(root, names: list[str]):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return root


def _host(datasets):
    return SimpleNamespace(data=SimpleNamespace(get=lambda key: datasets if key == "datasets" else None))


def test_the_child_gives_the_walks_digest_and_keeps_the_listing_for_the_next_changes(tmp_path):
    src = str(_tree(tmp_path / "src", ["a.bin", "d/b.bin", "d/e f.bin"]))
    dataset_listing.start(src)
    dataset_listing.start(src)  # a second host declaring it: still one child
    assert len(dataset_listing._started) == 1
    digest = dataset_listing.take(src)
    assert digest == dataset_walk.tree_digest(src)
    assert dataset_changes.changed(src, digest, digest, prune=False) == b"", "the child kept its listing"
    assert dataset_listing.take(src) is None, "taken once; a second ask walks"


def test_planning_takes_the_listing_made_ahead_instead_of_walking(tmp_path, planning_host, monkeypatch):
    src = str(_tree(tmp_path / "src", ["a.bin", "d/b.bin"]))
    planning_host({})
    dataset_listing.start(src)

    def no_walk(path):
        raise AssertionError(f"walked {path} in planning")

    monkeypatch.setattr(dataset_records, "tree_listing", no_walk)
    record = dataset_records.wanted_record(src, "/srv/datasets/x", ["--recursive"], None)
    assert record is not None and record["source"] == dataset_walk.tree_digest(src)


@pytest.mark.parametrize("how", ["unreadable source", "child prints something else"])
def test_a_child_that_fails_leaves_the_walk_to_planning(tmp_path, planning_host, monkeypatch, how):
    src = str(_tree(tmp_path / "src", ["a.bin"]))
    planning_host({})
    if how == "unreadable source":
        os.rename(src, src + ".moved")  # the child finds nothing; planning walks, and finds nothing either
        dataset_listing.start(src)
        assert dataset_listing.take(src) is None
        dataset_listing.start(src)
        assert dataset_records.wanted_record(src, "/srv/datasets/x", [], None) is None
        return
    monkeypatch.setattr(sys, "executable", "/bin/echo")  # prints its arguments, not a digest
    dataset_listing.start(src)
    assert dataset_listing.take(src) is None
    dataset_listing.start(src)
    record = dataset_records.wanted_record(src, "/srv/datasets/x", [], None)
    assert record is not None and record["source"] == dataset_walk.tree_digest(src)


def test_a_child_that_cannot_start_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    dataset_listing.start(str(tmp_path))
    assert dataset_listing.take(str(tmp_path)) is None


def test_only_local_sources_of_valid_settings_are_listed_each_once(tmp_path):
    mnist, imagenet, other = (str(_tree(tmp_path / name, ["a.bin"])) for name in ("mnist", "imagenet", "other"))
    hosts = [
        _host({"mnist": f"local:{mnist}", "imagenet": {"source": f"local:{imagenet}", "readonly": True}}),
        _host({"mnist": f"local:{mnist}", "peer": "host:pc01:/srv/datasets/mnist"}),
        _host({"broken": {"source": f"local:{other}", "colour": "red"}}),  # the settings check names it
        _host({"gone": f"local:{tmp_path / 'gone'}"}),
        _host(None),
        _host("not a mapping"),
    ]
    assert dataset_listing.local_sources(hosts) == [mnist, imagenet]


def test_the_inventory_registers_the_listing_once_and_the_first_connection_starts_it(tmp_path, monkeypatch):
    src = str(_tree(tmp_path / "src", ["a.bin"]))
    state = State(Inventory((["pc01"], {})), Config())
    with ctx_state.use(state):
        dataset_listing.list_datasets_ahead()
        dataset_listing.list_datasets_ahead()
    handlers = [h for h in state.callback_handlers if isinstance(h, dataset_listing._ListAhead)]
    assert len(handlers) == 1
    inventory = SimpleNamespace(iter_active_hosts=lambda: [_host({"x": f"local:{src}"})])
    handlers[0].host_before_connect(SimpleNamespace(inventory=inventory), None)
    assert dataset_listing.take(src) == dataset_walk.tree_digest(src)
