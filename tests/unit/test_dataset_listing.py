"""labfleet/dataset_listing.py: local: sources are listed while pyinfra connects, and planning takes that listing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_state

from labfleet import dataset_changes, dataset_listing, dataset_records, dataset_walk


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset_listing, "_started", {})
    monkeypatch.setattr(dataset_listing, "_waiting", type(dataset_listing._waiting)())


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
    dataset_listing.start(src)
    assert dataset_listing._started[src] is None, "no child after planning took it"


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


def test_the_inventory_file_leaves_one_greenlet_that_lists_when_pyinfra_connects(tmp_path):
    src = str(_tree(tmp_path / "src", ["a.bin"]))
    state = State()  # as while the inventory file runs: no hosts, no callbacks yet
    with ctx_state.use(state):
        dataset_listing.list_datasets_ahead()
        dataset_listing.list_datasets_ahead()
    assert list(dataset_listing._waiting) == [state]
    gevent.sleep(0.05)  # something yields before pyinfra connects: nothing is listed yet
    assert dataset_listing._started == {}
    state.init(Inventory(([("pc01", {"datasets": {"x": f"local:{src}"}})], {})), Config())
    state.set_stage(StateStage.Connect)
    gevent.sleep(0.05)
    assert list(dataset_listing._started) == [src]
    assert dataset_listing.take(src) == dataset_walk.tree_digest(src)


def test_a_state_that_never_connects_is_given_up_on(tmp_path):
    state = State()
    dataset_listing.list_when_connecting(state, tries=2)
    assert dataset_listing._started == {}


def test_the_real_cli_lists_ahead_for_the_inventory_file(tmp_path):
    """pyinfra itself: the inventory file's call, the greenlet, the child, the digest in planning."""
    src = str(_tree(tmp_path / "src", ["a.bin", "d/b.bin"]))
    inventory = tmp_path / "lab_inventory.py"
    inventory.write_text(
        "from labfleet.dataset_listing import list_datasets_ahead\n"
        f"lab = [('@local', {{'datasets': {{'x': 'local:{src}'}}}})]\n"
        "list_datasets_ahead()\n"
    )
    deploy = tmp_path / "lab_deploy.py"
    # Over SSH the connections yield and the greenlet starts the child before planning; @local's
    # do not, so the deploy file yields once, as a connection would.
    deploy.write_text(
        "import gevent\nfrom labfleet import dataset_listing\ngevent.sleep(0.1)\n"
        f"print('LISTED', dataset_listing.take({src!r}))\n"
    )
    ran = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", str(inventory), str(deploy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(dataset_listing.__file__).parent.parent)},
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"LISTED {dataset_walk.tree_digest(src)}" in ran.stdout, ran.stdout[-2000:]


def test_status_lists_nothing_ahead(monkeypatch):
    monkeypatch.setenv("LABFLEET_LIST_AHEAD", "0")  # what ./run status sets
    with ctx_state.use(State()):
        dataset_listing.list_datasets_ahead()
    assert list(dataset_listing._waiting) == []


def test_a_child_no_planning_took_is_stopped_when_pyinfra_exits(tmp_path, monkeypatch):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))
    dataset_listing.start(str(tmp_path))
    child = dataset_listing._started[str(tmp_path)]
    assert child is not None and child.poll() is None
    dataset_listing.stop_untaken()
    assert child.poll() is not None
