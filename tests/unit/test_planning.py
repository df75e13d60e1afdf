"""The planning layer: one batched read per host and run, and the one way to skip a current operation."""

from __future__ import annotations

import logging
import subprocess
from types import SimpleNamespace

import pytest
from fakes import PlanningHost
from pyinfra.api.exceptions import PyinfraError
from pyinfra.facts.deb import DebArch, DebPackages

from labfleet import planning
from labfleet.facts.docker import AppArmorEnabled, DaemonJson
from labfleet.planning import FactBatch, Read

ANSWERS = {DebPackages: {"curl": ["8.0"]}, DebArch: "amd64", AppArmorEnabled: False}


def test_every_step_reads_its_facts_in_one_batch_once_per_host_and_run(planning_host):
    fake = planning_host(ANSWERS)
    docker_reads = {"packages": Read(DebPackages), "arch": Read(DebArch)}
    other_reads = {"installed": Read(DebPackages), "apparmor": Read(AppArmorEnabled)}
    planning.read_ahead(docker_reads, other_reads)
    assert fake.reads == [FactBatch], "three distinct facts, one round trip"
    assert planning.read(docker_reads) == {"packages": {"curl": ["8.0"]}, "arch": "amd64"}
    assert planning.read(other_reads)["apparmor"] is False
    assert fake.reads == [FactBatch], "a step's own read costs nothing after read_ahead"


def test_a_snapshot_has_the_names_the_step_declared(planning_host):
    planning_host(ANSWERS)

    class State(SimpleNamespace):
        pass

    state = planning.snapshot(State, {"arch": Read(DebArch)})
    assert state.arch == "amd64"


def test_while_executing_every_read_is_fresh(planning_host):
    fake = planning_host(ANSWERS, executing=True)
    planning.read_ahead({"arch": Read(DebArch)})
    assert fake.reads == []
    assert planning.read({"arch": Read(DebArch)}) == {"arch": "amd64"}
    assert planning.read({"arch": Read(DebArch)}) == {"arch": "amd64"}
    assert fake.reads == [DebArch, DebArch]


def _operation(fake: PlanningHost, planned: list):
    def operation(**kwargs):
        fake.meta.ops += 1
        planned.append(kwargs)
        return kwargs

    return operation


def test_a_current_operation_is_not_planned_until_one_that_may_change_the_host_is(planning_host):
    fake = planning_host(ANSWERS)
    planned: list[dict] = []
    op = _operation(fake, planned)
    assert planning.unless_current(op, current=True, name="a") is None
    assert planning.notice(op, name="note") is not None
    assert planning.unless_current(op, current=True, name="b") is None, "a notice changes nothing"
    changing = planning.unless_current(op, current=False, name="c")
    later = planning.unless_current(op, current=True, name="d")
    assert [kw["name"] for kw in planned] == ["note", "c", "d"]
    # Planned once something may have changed: a current one reads nothing unless the host did change.
    assert changing["_if"]() is True
    assert later["_if"]() is False
    fake.state.ops[fake] = {"x": SimpleNamespace(operation_meta=SimpleNamespace(executed=True))}
    assert later["_if"]() is True


def test_while_executing_unless_current_plans_plainly(planning_host):
    fake = planning_host(ANSWERS, executing=True)
    planned: list[dict] = []
    planning.unless_current(_operation(fake, planned), current=True, name="a")
    assert planned == [{"name": "a"}]


def test_a_host_that_cannot_be_read_is_said_in_one_line_and_plans_against_defaults(planning_host, caplog):
    fake = planning_host(ANSWERS, fails=["sh: 1: sudo: not found", "Error: could not load fact: FactBatch <2 facts>"])
    with caplog.at_level(logging.ERROR, logger="pyinfra"):
        planning.read_ahead({"daemon": Read(DaemonJson), "arch": Read(DebArch)})
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "[pc01] host pc01: could not read the host's state: sh: 1: sudo: not found; sudo is not installed there; "
        "install it (apt-get install sudo) or connect as root"
    ]
    assert planning.read({"arch": Read(DebArch)})["arch"] is None
    assert fake in fake.state.failed_hosts


@pytest.mark.parametrize(
    ("output", "advice"),
    [
        (["sudo: a password is required"], "sudo asks for a password"),
        (["sudo: a terminal is required to read the password"], "sudo asks for a password"),
        (["bash: line 1: syntax error"], "check that the SSH user can run commands there with sudo"),
        ([], "the command failed and printed nothing"),
    ],
)
def test_read_failures_say_what_to_do(output, advice):
    line = planning.read_failure("pc02", output)
    assert line.startswith("host pc02: could not read the host's state: ") and advice in line
    assert "\n" not in line and "<class" not in line


def test_the_last_host_failing_still_gets_its_line(planning_host, caplog, monkeypatch):
    fake = planning_host(ANSWERS)

    def no_hosts_left(fact, **kwargs):
        logging.getLogger("pyinfra").error("[pc01] sudo: not found")
        raise PyinfraError("No hosts remaining!")

    monkeypatch.setattr(fake, "get_fact", no_hosts_left)
    with caplog.at_level(logging.ERROR, logger="pyinfra"), pytest.raises(SystemExit):
        planning.read_ahead({"daemon": Read(DaemonJson), "arch": Read(DebArch)})
    assert [r.getMessage() for r in caplog.records][-1].startswith("[pc01] host pc01: could not read the host's state")


def test_a_failed_batch_names_its_parts_briefly():
    parts = planning.Parts(((DebArch, {}), (DebPackages, {})))
    assert str(parts) == "<2 facts>"


def test_fact_batch_runs_its_parts_in_parallel_and_prints_them_in_order(tmp_path):
    (tmp_path / "daemon.json").write_text('{"a": 1}')
    batch = FactBatch()
    parts = (
        (DaemonJson, {"path": str(tmp_path / "daemon.json")}),
        (DaemonJson, {"path": str(tmp_path / "missing.json")}),
        (AppArmorEnabled, {}),
    )
    command = batch.command(parts=parts)
    assert command.rsplit("wait; ", 1)[1].count("cat ") == 1, "one cat prints every part"
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    daemon, missing, _ = batch.process(output.splitlines())
    assert daemon == {"present": True, "config": {"a": 1}, "error": None}
    assert missing == {"present": False, "config": None, "error": None}


def test_the_run_makes_shared_work_once():
    run = planning.Run()
    made: list[int] = []
    assert run.once("archive", lambda: made.append(1) or "a") == "a"
    assert run.once("archive", lambda: made.append(2) or "b") == "a"
    assert made == [1]
