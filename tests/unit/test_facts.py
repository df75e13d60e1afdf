"""The plan-time facts that keep a no-change run to a few round trips per host."""

import hashlib
import subprocess

from labfleet import planning
from labfleet.facts import docker as docker_facts
from labfleet.facts import system as facts


def test_accounts_parses_getent_and_the_home_directory():
    lines = [
        "account lab 1000 1000 lab directory lab lab /home/lab",
        "account ghost 1001 1001 - absent - - /home/with space",
    ]
    accounts = facts.Accounts().process(lines)
    assert accounts["lab"] == {
        "uid": "1000",
        "gid": "1000",
        "group": "lab",
        "home": "/home/lab",
        "home_state": {"kind": "directory", "user": "lab", "group": "lab"},
    }
    assert accounts["ghost"]["group"] is None and accounts["ghost"]["home"] == "/home/with space"


def test_path_states_runs_and_parses_on_this_machine(tmp_path):
    (tmp_path / "a file").write_text("x\n")
    (tmp_path / "dir").mkdir(mode=0o750)
    (tmp_path / "dir").chmod(0o2750)
    paths = (str(tmp_path / "a file"), str(tmp_path / "dir"), str(tmp_path / "missing"))
    fact = facts.PathStates()
    command = fact.command(paths=paths, digests=paths[:1])
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    states = fact.process(output.splitlines())
    assert states[paths[0]]["kind"] == "file"
    assert states[paths[0]]["sha1"] == hashlib.sha1(b"x\n").hexdigest()
    assert facts.path_is(states, paths[1], "directory", mode="2750")
    assert not facts.path_is(states, paths[1], "directory", mode="750")
    assert paths[2] not in states and not facts.path_is(states, paths[2], "file")


def test_path_states_tells_links_empty_files_and_others_apart(tmp_path):
    (tmp_path / "empty").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    paths = (str(tmp_path / "empty"), str(tmp_path / "link"), "/dev/null")
    fact = facts.PathStates()
    command = fact.command(paths=paths, digests=paths)
    assert command.count("stat --printf") == 1 and command.count("sha1sum ") == 1, "two programs for any number"
    states = fact.process(subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout.splitlines())
    assert states[paths[0]]["kind"] == "file" and states[paths[0]]["sha1"] == hashlib.sha1(b"").hexdigest()
    assert states[paths[1]] == {"kind": "link", "user": "-", "group": "-", "mode": "-", "sha1": None}
    assert states[paths[2]]["kind"] == "other" and not facts.path_is(states, paths[2], "file", mode=644)


def test_service_state_reads_both_states_from_one_systemctl():
    fact = facts.ServiceState()
    assert fact.command(service="docker.service").count("systemctl ") == 1
    state = fact.process(["systemd", "ActiveState=active", "UnitFileState=enabled"])
    assert state == {"systemd": True, "active": "active", "enabled": "enabled"}
    # A unit that does not exist has an empty UnitFileState; no systemd prints nothing.
    assert fact.process(["systemd", "ActiveState=inactive", "UnitFileState="])["enabled"] is None
    assert fact.process([]) == {"systemd": False, "active": None, "enabled": None}


def test_fact_batch_runs_its_parts_in_parallel_and_prints_them_in_order(tmp_path):
    (tmp_path / "daemon.json").write_text('{"a": 1}')
    batch = planning.FactBatch()
    parts = (
        (facts.PathStates, {"paths": (str(tmp_path),)}),
        (docker_facts.DaemonJson, {"path": str(tmp_path / "daemon.json")}),
        (docker_facts.DaemonJson, {"path": str(tmp_path / "missing.json")}),
        (docker_facts.AppArmorEnabled, {}),
    )
    command = batch.command(parts=parts)
    assert command.rsplit("wait; ", 1)[1].count("cat ") == 1, "one cat prints every part"
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    states, daemon, missing, _ = batch.process(output.splitlines())
    assert states[str(tmp_path)]["kind"] == "directory"
    assert daemon == {"present": True, "config": {"a": 1}, "error": None}
    assert missing == {"present": False, "config": None, "error": None}
    assert not list(tmp_path.glob("tmp*")), "the batch's files are removed"


def test_path_is_compares_only_what_is_asked():
    states = {"/x": {"kind": "file", "user": "root", "group": "root", "mode": "644", "sha1": "abc"}}
    assert facts.path_is(states, "/x", "file", "root", "root", 644, "abc")
    assert facts.path_is(states, "/x", "file")
    assert not facts.path_is(states, "/x", "file", sha1="other")
    assert not facts.path_is(states, "/x", "directory")
    assert not facts.path_is(states, "/x", "file", user="lab")
