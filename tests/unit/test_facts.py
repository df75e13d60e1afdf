"""The plan-time facts that keep a no-change run to a few round trips per host."""

import hashlib
import subprocess

from labfleet import facts


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


def test_path_is_compares_only_what_is_asked():
    states = {"/x": {"kind": "file", "user": "root", "group": "root", "mode": "644", "sha1": "abc"}}
    assert facts.path_is(states, "/x", "file", "root", "root", 644, "abc")
    assert facts.path_is(states, "/x", "file")
    assert not facts.path_is(states, "/x", "file", sha1="other")
    assert not facts.path_is(states, "/x", "directory")
    assert not facts.path_is(states, "/x", "file", user="lab")
