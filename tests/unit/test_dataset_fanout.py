"""labfleet/dataset_fanout.py without hosts: the tree of pulls, its bounds, its order, its fallbacks."""

import random
import shlex
from types import SimpleNamespace

import pytest

from labfleet import dataset_fanout, dataset_pull, planning
from labfleet.dataset_fanout import Puller, plan_tree
from labfleet.facts.datasets import RsyncDryRun
from labfleet.settings import build

ORIGIN = "pc00"


def _pullers(count: int, bound: int | None = 2, serves: bool = True) -> list[Puller]:
    return [Puller(f"pc{index:02d}", serves, bound) for index in range(1, count + 1)]


def _check_bounds(plan, bounds: dict[str, int | None], holders=frozenset()) -> None:
    """Each server takes at most its bound per wave (holders refreshing from the origin aside),
    and serves only from the wave after its own pull."""
    taken: dict[tuple[int, str], int] = {}
    for name, (wave, parent) in plan.items():
        if name in holders:
            assert (wave, parent) == (1, ORIGIN)
            continue
        taken[(wave, parent)] = taken.get((wave, parent), 0) + 1
        if parent != ORIGIN:
            assert plan[parent][0] < wave, f"{name} pulls from {parent} before {parent} has it"
    for (_, server), count in taken.items():
        bound = bounds.get(server)
        assert bound is None or count <= bound, f"{server} serves {count} at once, bound {bound}"


def test_six_pullers_with_a_bound_of_two_make_a_tree_of_two_waves():
    plan = plan_tree(ORIGIN, 2, _pullers(6), set())
    assert plan == {
        "pc01": (1, ORIGIN),
        "pc02": (1, ORIGIN),
        "pc03": (2, "pc01"),
        "pc04": (2, "pc02"),
        "pc05": (2, ORIGIN),
        "pc06": (2, "pc01"),
    }
    _check_bounds(plan, {ORIGIN: 2, **{p.name: 2 for p in _pullers(6)}})
    assert dataset_fanout.waves(plan) == 2


@pytest.mark.parametrize(("count", "bound", "waves"), [(1, 2, 1), (2, 2, 1), (8, 2, 2), (9, 2, 3), (26, 2, 3),
                                                      (27, 2, 4), (7, 1, 3), (50, 3, 3)])  # fmt: skip
def test_every_puller_is_placed_within_the_bounds(count, bound, waves):
    pullers = _pullers(count, bound)
    plan = plan_tree(ORIGIN, bound, pullers, set())
    assert sorted(plan) == [p.name for p in pullers]
    _check_bounds(plan, {ORIGIN: bound, **{p.name: bound for p in pullers}})
    assert dataset_fanout.waves(plan) == waves


def test_the_plan_does_not_depend_on_the_order_pullers_are_listed():
    pullers = _pullers(11)
    expected = plan_tree(ORIGIN, 2, pullers, {"pc07", "pc03"})
    for seed in range(5):
        shuffled = pullers[:]
        random.Random(seed).shuffle(shuffled)
        assert plan_tree(ORIGIN, 2, shuffled, {"pc03", "pc07"}) == expected


def test_holders_refresh_from_the_origin_first_and_serve_the_rest():
    holders = {"pc04", "pc05", "pc06"}
    plan = plan_tree(ORIGIN, 2, _pullers(6), holders)
    # The holders do not use the origin's bound: two new hosts still pull from it in wave 1,
    # and the last one from a host that pulled in wave 1 (those serve before the origin).
    assert plan == {
        "pc01": (1, ORIGIN),
        "pc02": (1, ORIGIN),
        "pc03": (2, "pc01"),
        "pc04": (1, ORIGIN),
        "pc05": (1, ORIGIN),
        "pc06": (1, ORIGIN),
    }
    many = plan_tree(ORIGIN, 1, _pullers(8), {"pc01", "pc02", "pc03"})
    _check_bounds(many, {ORIGIN: 1, **{p.name: 1 for p in _pullers(8)}}, holders={"pc01", "pc02", "pc03"})
    # Wave 2: the three holders and pc04 (pulled in wave 1) take the other four; the origin rests.
    assert sorted(parent for wave, parent in many.values() if wave == 2) == ["pc01", "pc02", "pc03", "pc04"]


def test_a_writable_copy_is_never_passed_on():
    writable = [Puller("pc01", False, 2), Puller("pc02", False, 2), *_pullers(4)[2:]]
    plan = plan_tree(ORIGIN, 2, writable, set())
    assert {parent for _, parent in plan.values()} <= {ORIGIN, "pc03", "pc04"}
    assert all(parent == ORIGIN for _, parent in plan.values())  # pc03, pc04 pulled in wave 2 too


def test_no_bound_on_the_origin_is_the_star():
    plan = plan_tree(ORIGIN, None, _pullers(6), set())
    assert plan == {p.name: (1, ORIGIN) for p in _pullers(6)}


def test_pullers_left_over_for_the_last_planned_wave_pull_from_the_origin():
    plan = plan_tree(ORIGIN, 1, _pullers(6, bound=1), set(), max_waves=2)
    assert dataset_fanout.waves(plan) == 2
    assert plan["pc02"] == (2, "pc01")
    assert [name for name, (wave, parent) in plan.items() if wave == 2 and parent == ORIGIN] == [
        "pc03",
        "pc04",
        "pc05",
        "pc06",
    ]


# --- trees of a fleet, from settings ----------------------------------------------------------


def _fleet(raw, pullers: int, **extra):
    fleet = {"pc00": build("pc00", {**raw, "datasets": {"ref": "manual"}})}
    for index in range(1, pullers + 1):
        name = f"pc{index:02d}"
        spec = {"source": "host:pc00:/srv/datasets/ref", **extra.get(name, {})}
        fleet[name] = build(name, {**raw, "datasets": {"ref": spec}, "lan_address": f"10.0.0.{index}"})
    return fleet


def test_only_sources_with_more_pullers_than_the_bound_make_a_tree(raw):
    assert dataset_fanout.trees(_fleet(raw, 2)) == []
    (tree,) = dataset_fanout.trees(_fleet(raw, 3))
    assert (tree.origin, tree.path, tree.origin_bound, tree.planned_waves()) == ("pc00", "/srv/datasets/ref", 2, 2)
    # No bound on the origin: every puller pulls from it at once, as before.
    star = _fleet(raw, 6)
    star["pc00"] = build("pc00", {**raw, "datasets": {"ref": "manual"}, "dataset_fanout": None})
    assert dataset_fanout.trees(star) == []
    # prune splits a source: a copy that keeps files the origin removed is not passed to one that prunes.
    split = _fleet(raw, 4, pc03={"prune": True}, pc04={"prune": True})
    assert dataset_fanout.trees(split) == []


def test_servers_trust_the_other_pullers_of_their_tree_only(raw):
    fleet = _fleet(raw, 4, pc04={"readonly": False})
    assert dataset_fanout.parents_of(fleet, "pc04") == ["pc01", "pc02", "pc03"]
    assert dataset_fanout.parents_of(fleet, "pc01") == ["pc02", "pc03"]
    assert dataset_fanout.parents_of(fleet, "pc00") == []
    children = dataset_fanout.children_of(fleet, "pc01")
    assert [(s.host, d.name, here) for s, d, here in children] == [
        ("pc02", "ref", "/srv/datasets/ref"),
        ("pc03", "ref", "/srv/datasets/ref"),
        ("pc04", "ref", "/srv/datasets/ref"),
    ]
    assert dataset_fanout.children_of(fleet, "pc04") == []  # writable: serves nobody


def test_a_pull_can_come_from_the_origin_or_any_server_of_its_tree(raw):
    fleet = _fleet(raw, 3)
    pull = dataset_fanout.plan_pull(fleet["pc03"], fleet, fleet["pc03"].datasets[0])
    assert sorted(pull.commands) == ["pc00", "pc01", "pc02"]
    assert "labfleet-sync@10.0.0.1:./" in pull.commands["pc01"]
    assert pull.forget == ("/var/lib/labfleet/datasets/ref.verified", "/var/lib/labfleet/datasets/ref.pulled")
    alone = _fleet(raw, 1)
    single = dataset_fanout.plan_pull(alone["pc01"], alone, alone["pc01"].datasets[0])
    assert (sorted(single.commands), single.tree) == (["pc00"], None)


def test_a_host_with_a_record_of_a_verified_pull_holds_a_copy(raw):
    fleet = _fleet(raw, 3)
    (tree,) = dataset_fanout.trees(fleet)
    member = tree.member("pc01")
    record = dataset_fanout.wanted_record(member.settings, member.dataset)
    assert dataset_fanout.holds_copy(member, {"record": record, "stamp": None})
    assert not dataset_fanout.holds_copy(member, {"record": None, "stamp": None})
    assert not dataset_fanout.holds_copy(member, None)
    # Another source, or other settings (prune, readonly, group), is not this copy.
    other = build("pc01", {**raw, "datasets": {"ref": {"source": "host:pc00:/srv/datasets/ref", "prune": True}}})
    assert dataset_fanout.wanted_record(other, other.datasets[0]) != record


# --- the wave operation ---------------------------------------------------------------------


def _wave_host(fake_host_in, monkeypatch, failed=()):
    fake = fake_host_in(dataset_pull, {RsyncDryRun: {"rc": 0, "changes": ["x"], "errors": []}})
    monkeypatch.setattr(dataset_fanout, "host", fake)
    fake.logs = []
    fake.log_styled = lambda message, **kwargs: fake.logs.append(message)
    fake.inventory = SimpleNamespace(get_host=lambda name: name)
    fake.state.failed_hosts = set(failed)
    return fake


def _pull(raw, fake_plan, monkeypatch):
    fleet = _fleet(raw, 3)
    monkeypatch.setattr(dataset_fanout, "current_plan", lambda tree: fake_plan)
    # The FakeHost is pc01.
    return dataset_fanout.plan_pull(fleet["pc01"], fleet, fleet["pc01"].datasets[0])


def test_a_host_pulls_in_its_wave_from_its_parent(raw, fake_host_in, monkeypatch):
    fake = _wave_host(fake_host_in, monkeypatch)
    pull = _pull(raw, {"pc01": (2, "pc02")}, monkeypatch)
    assert list(dataset_fanout.pull_wave._inner(wave=1, pulls=[pull])) == []
    assert fake.noops == ["no dataset to pull in wave 1"]
    commands = list(dataset_fanout.pull_wave._inner(wave=2, pulls=[pull]))
    assert commands == [
        "rm -f /var/lib/labfleet/datasets/ref.verified /var/lib/labfleet/datasets/ref.pulled",
        pull.commands["pc02"],
    ]
    assert "labfleet-sync@10.0.0.2:./" in shlex.split(commands[1])
    assert fake.logs == ["wave 2: pulling pc02:/srv/datasets/ref"]


def test_a_parent_that_failed_earlier_is_replaced_by_the_origin(raw, fake_host_in, monkeypatch):
    fake = _wave_host(fake_host_in, monkeypatch, failed=["pc02"])
    pull = _pull(raw, {"pc01": (2, "pc02")}, monkeypatch)
    commands = list(dataset_fanout.pull_wave._inner(wave=2, pulls=[pull]))
    assert commands[1] == pull.commands["pc00"]
    assert fake.logs[0] == "ref: pc02 failed earlier in this run; pulling from pc00 instead"


def test_the_runs_tree_comes_from_every_hosts_batch_once_and_a_preview_is_not_kept(raw, fake_host_in, monkeypatch):
    fleet = _fleet(raw, 3)
    (tree,) = dataset_fanout.trees(fleet)
    run = planning.Run()
    monkeypatch.setattr(dataset_fanout.planning, "current_run", lambda: run)
    fake = fake_host_in(dataset_fanout, executing=False)

    def read(name: str, holds: bool) -> None:
        member = tree.member(name)
        record = dataset_fanout.wanted_record(member.settings, member.dataset) if holds else None
        key = dataset_fanout.reads(member.settings)["pulled"].key
        run.for_host(name).readings[key] = {"ref": {"record": record, "stamp": None}}

    # Previewing while planning (pyinfra without -y), pc01 is the only host read so far.
    read("pc01", holds=False)
    assert dataset_fanout.current_plan(tree) == {"pc01": (1, "pc00")}
    # Every host read, pc03 with a record of a verified pull: it refreshes in wave 1 and serves.
    read("pc02", holds=False)
    read("pc03", holds=True)
    fake.state.is_executing = True
    plan = dataset_fanout.current_plan(tree)
    assert plan == {"pc01": (1, "pc00"), "pc02": (1, "pc00"), "pc03": (1, "pc00")}
    # The same plan for every host of the run, whatever is read later.
    read("pc03", holds=False)
    assert dataset_fanout.current_plan(tree) is plan
