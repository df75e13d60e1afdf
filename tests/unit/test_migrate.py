"""labfleet/migrate.py without hosts: its settings, what is pulled and how, the cut-over's decisions and lines."""

from __future__ import annotations

import shlex
import subprocess
from types import SimpleNamespace

import pytest

from labfleet import dataset_pull, migrate, migrate_sudo
from labfleet.facts.jupyter import ComposeService
from labfleet.facts.migrate import MarkerFact, MigrationPending, parse_markers, parse_pending
from labfleet.facts.updates import ContainerBusy
from labfleet.settings import SettingsError, build

FLEET = frozenset({"pc03.lab", "pc09.lab"})


def _fleet(raw, new=None, old=None) -> dict:
    """pc03.lab (old) and pc09.lab (new), both with the users alice and bob; alice's home elsewhere on pc09."""
    base = {**raw, "jupyter_user": None}
    old_data = {**base, "jupyter_users": ["alice", "bob"], **(old or {})}
    new_data = {
        **base,
        "jupyter_users": [{"name": "alice", "home_dir": "/data/home/alice"}, "carol"],
        "migrate_from": "pc03.lab",
        **(new or {}),
    }
    return {
        "pc03.lab": build("pc03.lab", old_data, FLEET),
        "pc09.lab": build("pc09.lab", new_data, FLEET),
    }


# --- Settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            {"migrate_from": "pc07.lab"},
            "host pc09.lab: migrate_from = 'pc07.lab' is not in the inventory; expected one of its hosts (pc03.lab): "
            "keep the old PC in the inventory until the cut-over",
        ),
        (
            {"migrate_from": "pc09.lab"},
            "host pc09.lab: migrate_from = 'pc09.lab' names this host itself; "
            "expected the inventory name of the old PC that holds the users' files",
        ),
        (
            {"migrate_from": 3},
            "host pc09.lab: migrate_from = 3 is invalid (not a non-empty string); "
            "expected null or the inventory name of the old PC, such as pc03.lab",
        ),
        (
            {"migrate_from": "pc03.lab", "migrate_final": "yes"},
            "host pc09.lab: migrate_final = 'yes' is invalid; expected true or false (true needs migrate_from)",
        ),
        (
            {"migrate_final": True},
            "host pc09.lab: migrate_final = True is invalid without migrate_from; "
            'expected migrate_from = "<old PC>" beside it (or migrate_final = False)',
        ),
        (
            {
                "migrate_from": "pc03.lab",
                "restore_from": "backup",
                "backup_repository": "/mnt/restic",
                "backup_password_file": "/etc/hostname",
            },
            "host pc09.lab: restore_from = 'backup' is invalid with migrate_from = 'pc03.lab'; "
            "expected one of them: migrate_from while the old PC lives, restore_from when it is gone",
        ),
    ],
)
def test_a_bad_migration_setting_is_one_line_naming_host_key_value_and_form(raw, data, line):
    with pytest.raises(SettingsError) as raised:
        build("pc09.lab", {**raw, **data}, FLEET)
    assert str(raised.value).splitlines() == [line]


def test_a_migration_from_an_inventory_host_is_accepted(raw):
    settings = build("pc09.lab", {**raw, "migrate_from": "pc03.lab", "migrate_final": True}, FLEET)
    assert (settings.migrate_from, settings.migrate_final) == ("pc03.lab", True)
    assert build("pc09.lab", raw, FLEET).migrate_from is None


# --- What moves, and how ---------------------------------------------------------------------


def test_each_shared_user_pulls_workspace_and_home_from_the_old_pcs_own_paths(raw):
    fleet = _fleet(raw)
    pulls = migrate.pulls(fleet["pc09.lab"], fleet)
    # carol is not on the old PC, bob is not on the new one: only alice moves.
    assert [(p.user, p.kind, p.source, p.dest) for p in pulls] == [
        ("alice", "workspace", "/srv/workspace/alice", "/srv/workspace/alice"),
        ("alice", "home", "/srv/home/alice", "/data/home/alice"),
    ]
    assert migrate.served(fleet["pc03.lab"], fleet) == pulls
    assert migrate.served(fleet["pc09.lab"], fleet) == []
    assert migrate.leaving(fleet["pc03.lab"], fleet) == {}
    final = _fleet(raw, new={"migrate_final": True})
    assert migrate.leaving(final["pc03.lab"], final) == {"alice": "pc09.lab"}
    assert migrate.leaving(final["pc09.lab"], final) == {}
    # Key files and tags of their own, which no dataset name can take.
    assert pulls[0].key == "/etc/labfleet/dataset-pull/migrate/id_alice_workspace"
    assert pulls[1].comment == "labfleet-pull:migrate/alice/home@pc09.lab"


def test_the_pull_maps_owners_by_name_keeps_newer_files_and_deletes_nothing(raw):
    fleet = _fleet(raw, old={"lan_address": "10.0.0.3"})
    home = migrate.pulls(fleet["pc09.lab"], fleet)[1]
    command = migrate.pull_command(home, fleet)
    argv = shlex.split(command.replace('"$(id -gn alice)"', "GROUP"))
    assert argv[:2] == ["rsync", "--chown=alice:GROUP"], "the owner is the account's name on the new PC"
    assert '--chown=alice:"$(id -gn alice)"' in command
    assert "--update" in argv and "--perms" in argv and "--links" in argv and "--omit-dir-times" in argv
    assert not [flag for flag in argv if flag.startswith(("--delete", "--remove", "--inplace", "--partial"))]
    assert "--exclude=/.local/share/jupyter/runtime/" in argv
    assert argv[-2:] == ["labfleet-sync@10.0.0.3:./", "/data/home/alice/"]
    rsh = argv[argv.index("--rsh") + 1]
    assert "-i /etc/labfleet/dataset-pull/migrate/id_alice_home" in rsh
    assert "UserKnownHostsFile=/etc/labfleet/dataset-pull/migrate/known_hosts" in rsh
    assert "StrictHostKeyChecking=yes" in rsh


def test_the_old_pc_lets_the_sync_account_read_as_the_owner_and_nothing_else(raw):
    fleet = _fleet(raw)
    served = migrate.served(fleet["pc03.lab"], fleet)
    assert migrate_sudo.sudoers_text(served).splitlines()[2:] == [
        'Defaults:labfleet-sync env_keep += "SSH_ORIGINAL_COMMAND"',
        "labfleet-sync ALL=(alice) NOPASSWD: /usr/bin/rrsync -ro /srv/workspace/alice, "
        "/usr/bin/rrsync -ro /srv/home/alice",
    ]
    line = dataset_pull.authorized_key_line(
        "ssh-ed25519 K labfleet-pull:migrate/alice/home@pc09.lab",
        "/srv/home/alice",
        "10.0.0.9",
        "/usr/bin/rrsync",
        "alice",
    )
    assert line == (
        'restrict,from="10.0.0.9",command="sudo -n -u alice /usr/bin/rrsync -ro /srv/home/alice" '
        "ssh-ed25519 K labfleet-pull:migrate/alice/home@pc09.lab"
    )
    odd = _fleet(raw, old={"workspace_dir": "/srv/work space/{user}"})
    unplain = migrate_sudo.unplain_paths(migrate.served(odd["pc03.lab"], odd))
    assert unplain == ["/srv/work space/alice"]
    assert migrate_sudo.unplain_problem("pc03.lab", unplain) == (
        "host pc03.lab: cannot serve migrations of /srv/work space/alice: a sudo rule cannot name such a path; "
        "use workspace_dir / home_dir made of letters, digits and . _ - @ + /"
    )


def test_the_status_shows_a_moved_project_and_one_waiting_for_the_cut_over(raw, monkeypatch):
    fleet = _fleet(raw)
    monkeypatch.setattr(migrate, "_all_settings", lambda: fleet)
    assert migrate.moves(fleet["pc03.lab"], {"alice": "pc09.lab", "bob": None}) == {"alice": "migrated to pc09.lab"}
    assert migrate.moves(fleet["pc09.lab"], {"alice": None, "carol": None}) == {
        "alice": "moves here from pc03.lab at the cut-over (migrate_final)"
    }
    final = _fleet(raw, new={"migrate_final": True})
    monkeypatch.setattr(migrate, "_all_settings", lambda: final)
    assert migrate.moves(final["pc09.lab"], {"alice": None}) == {}


# --- Facts --------------------------------------------------------------------------------------


def test_markers_are_read_by_user_from_the_project_directories(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "migrated-to").write_text("pc09.lab at 2026-12-02T12:00:00Z\n")
    fact = MarkerFact()
    markers = (("alice", str(tmp_path / "alice" / "migrated-to")), ("bob", str(tmp_path / "bob" / "migrated-to")))
    out = subprocess.run(["sh", "-c", fact.command(markers)], capture_output=True, text=True, check=True)
    assert fact.process(out.stdout.splitlines()) == {"alice": "pc09.lab", "bob": None}
    assert parse_markers(["marker bob pc10.lab at x"]) == {"bob": "pc10.lab"}


def test_a_dry_run_counts_what_moves_but_not_the_top_directorys_own_mode():
    lines = [".d...p..... ./", ">f+++++++++ notes/a b.txt", "cd+++++++++ notes/", "labfleet-rc=0"]
    assert parse_pending(lines) == {
        "done": False,
        "rc": 0,
        "changes": [">f+++++++++ notes/a b.txt", "cd+++++++++ notes/"],
        "errors": [],
    }
    assert parse_pending([".d...p..... ./", "labfleet-rc=0"])["changes"] == []
    assert parse_pending(["ssh: connect to host 10.0.0.3 port 22: No route to host", "labfleet-rc=255"])["rc"] == 255
    assert parse_pending(["labfleet-migrated"]) == {"done": True, "rc": 0, "changes": [], "errors": []}


def test_after_the_final_pass_the_old_pc_is_not_read_at_all(tmp_path):
    stamp = tmp_path / "alice"
    stamp.write_text("pc03.lab\n")
    fact = MigrationPending()
    command = fact.command(command="echo read-the-old-pc", stamp=str(stamp), old="pc03.lab")
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["labfleet-migrated"]
    stamp.write_text("pc02.lab\n")
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["read-the-old-pc --dry-run", "labfleet-rc=0"]


# --- Operations ---------------------------------------------------------------------------------


class _Peer:
    def __init__(self, name, facts=None):
        self.name, self.facts = name, facts or {}

    def get_fact(self, fact, **kwargs):
        return self.facts[fact]


def _with_peers(fake, peers=(), failed=()):
    found = {peer.name: peer for peer in peers}
    for name in failed:
        found.setdefault(name, _Peer(name))
    fake.inventory = SimpleNamespace(get_host=lambda name: found[name])
    fake.state.failed_hosts = {found[name] for name in failed}
    return fake


def _fails_with(commands: list) -> str:
    """Run the last command an operation yielded; it must fail with one line on stderr."""
    ran = subprocess.run(["sh", "-c", str(commands[-1])], capture_output=True, text=True, check=False)
    assert ran.returncode == 1 and ran.stdout == ""
    (line,) = ran.stderr.splitlines()
    assert line.startswith("labfleet: host pc01: ")
    return line.removeprefix("labfleet: ")


RUNNING = {
    "image_id": "sha256:a",
    "container_image": "sha256:a",
    "status": "running",
    "health": "healthy",
    "digest": "d",
}
BUSY = {"checked": True, "busy": True, "reasons": ["kernel python3 ran 2 min ago"], "notes": []}
IDLE = {"checked": True, "busy": False, "reasons": [], "notes": []}


def _stop(fake_host_in, facts, force=False, failed=()):
    fake = _with_peers(fake_host_in(migrate, facts), [_Peer("pc09.lab")], failed)
    fake.state.is_executing = False  # planning's pass: the warning is logged once, while executing
    commands = list(
        migrate.stop_for_cut_over._inner(user="alice", target="pc09.lab", force=force, idle_seconds=1800, image="t")
    )
    return fake, commands


def test_a_busy_old_container_is_left_running_unless_forced(fake_host_in):
    fake, commands = _stop(fake_host_in, {MarkerFact: {"alice": None}, ComposeService: RUNNING, ContainerBusy: BUSY})
    assert commands == []
    assert fake.noops == ["the cut-over of alice to pc09.lab waits: kernel python3 ran 2 min ago"]

    _, commands = _stop(fake_host_in, {MarkerFact: {"alice": None}, ComposeService: RUNNING}, force=True)
    assert commands[0] == "docker stop labfleet-alice-jupyterlab-1 >/dev/null"
    assert commands[1] == "systemctl disable --now labfleet-update-alice.timer 2>/dev/null || true"
    assert "docker rm" not in " ".join(commands) and "down" not in " ".join(commands)


def test_an_idle_old_container_is_stopped_not_removed_and_marked(fake_host_in, tmp_path, monkeypatch):
    monkeypatch.setattr(migrate.compose, "APP_ROOT", str(tmp_path))
    _, commands = _stop(fake_host_in, {MarkerFact: {"alice": None}, ComposeService: RUNNING, ContainerBusy: IDLE})
    assert commands[0] == "docker stop labfleet-alice-jupyterlab-1 >/dev/null"
    subprocess.run(["sh", "-c", commands[-1]], check=True)
    text = (tmp_path / "alice" / "migrated-to").read_text()
    assert text.startswith("pc09.lab at 20") and MarkerFact().process([f"marker alice {text}"]) == {"alice": "pc09.lab"}

    fake, commands = _stop(fake_host_in, {MarkerFact: {"alice": "pc09.lab"}})
    assert commands == [] and fake.noops == ["JupyterLab of alice already moved to pc09.lab"]


def _pull(fake_host_in, pending, peers=(), failed=(), final=False):
    fake = _with_peers(fake_host_in(migrate, {MigrationPending: pending}), peers or [_Peer("pc03.lab")], failed)
    pulls = [("workspace", "/srv/workspace/alice", "rsync ws", "/srv/workspace/alice")]
    commands = list(
        migrate.pull_user_files_from._inner(
            old="pc03.lab",
            user="alice",
            pulls=pulls,
            stamp="/s/alice",
            final=final,
            done=pending["done"],
            image="t",
            idle_seconds=1800,
        )
    )
    return fake, commands


CHANGED = {"done": False, "rc": 0, "changes": [">f+++++++++ a"], "errors": []}
SAME = {"done": False, "rc": 0, "changes": [], "errors": []}


def test_a_pull_moves_only_what_the_dry_run_lists(fake_host_in):
    _, commands = _pull(fake_host_in, CHANGED)
    assert commands == ["rsync ws"]
    fake, commands = _pull(fake_host_in, SAME)
    assert commands == [] and fake.noops == ["alice's workspace and home already have everything from pc03.lab"]
    fake, commands = _pull(fake_host_in, {"done": True, "rc": 0, "changes": [], "errors": []})
    assert commands == [] and fake.noops == ["alice's files came from pc03.lab in the final pass already"]


def test_an_unreachable_old_pc_fails_the_new_pc_with_one_line(fake_host_in):
    refused = {"done": False, "rc": 255, "changes": [], "errors": ["ssh: connect to host 10.0.0.3 port 22: No route"]}
    _, commands = _pull(fake_host_in, refused, peers=[_Peer("pc03.lab")])
    assert _fails_with(commands) == (
        "host pc01: cannot pull alice's workspace pc03.lab:/srv/workspace/alice (rsync exit 255): "
        "ssh: connect to host 10.0.0.3 port 22: No route; check that pc03.lab is up and that pc01 reaches it "
        "(lan_address / lan_ssh_port of pc03.lab), then run again: what arrived is whole and is not sent twice"
    )
    _, commands = _pull(fake_host_in, CHANGED, failed=["pc03.lab"])
    assert _fails_with(commands) == (
        "host pc01: cannot migrate alice from pc03.lab: pc03.lab failed earlier in this run "
        "(its error is above); fix what stopped it and run again"
    )


def test_the_final_pass_pulls_only_after_the_old_pc_handed_over_then_stamps(fake_host_in):
    handed = _Peer("pc03.lab", {MarkerFact: {"alice": "pc01"}})
    _, commands = _pull(fake_host_in, CHANGED, peers=[handed], final=True)
    assert commands[0] == "rsync ws"
    assert commands[1] == "install -d -m 0755 /s && printf %s 'pc03.lab\n' > /s/alice"

    busy = _Peer("pc03.lab", {MarkerFact: {"alice": None}, ComposeService: RUNNING, ContainerBusy: BUSY})
    _, commands = _pull(fake_host_in, CHANGED, peers=[busy], final=True)
    assert _fails_with(commands) == (
        "host pc01: the cut-over of alice from pc03.lab did not happen: its JupyterLab there is busy "
        "(kernel python3 ran 2 min ago); nothing was moved, and JupyterLab of alice stays on pc03.lab; "
        "run again once it is idle, or stop it now with --data jupyter_update=now"
    )

    elsewhere = _Peer("pc03.lab", {MarkerFact: {"alice": "pc10.lab"}})
    _, commands = _pull(fake_host_in, CHANGED, peers=[elsewhere], final=True)
    assert _fails_with(commands) == (
        "host pc01: the cut-over of alice from pc03.lab did not happen: pc03.lab marks that project as moved to "
        "pc10.lab; nothing was moved, and JupyterLab of alice stays on pc03.lab; set migrate_from on pc10.lab "
        "instead, or delete /opt/labfleet/alice/migrated-to on pc03.lab"
    )


def test_the_sudoers_drop_in_is_checked_before_it_replaces_the_old_one(tmp_path):
    (command,) = list(migrate_sudo.sudoers_file._inner(path=str(tmp_path / "rules"), text="x\n"))
    assert "visudo -cqf" in command and command.index("visudo") < command.index("install -m 0440")


def test_jupyterlab_is_held_back_on_the_old_pc_after_and_during_the_cut_over_and_on_the_new_pc_before(raw, monkeypatch):
    waiting = _fleet(raw)
    monkeypatch.setattr(migrate, "_all_settings", lambda: waiting)
    monkeypatch.setattr(migrate.planning, "read", lambda reads: {"markers": {"alice": None, "carol": None}})
    assert migrate.held_back(waiting["pc09.lab"]) == {
        "alice": "JupyterLab of alice starts here at the cut-over from pc03.lab (migrate_final = True); "
        "until then it runs there"
    }
    final = _fleet(raw, new={"migrate_final": True})
    monkeypatch.setattr(migrate, "_all_settings", lambda: final)
    assert migrate.held_back(final["pc09.lab"]) == {}
    monkeypatch.setattr(migrate.planning, "read", lambda reads: {"markers": {"alice": None, "bob": "pc10.lab"}})
    assert migrate.held_back(final["pc03.lab"]) == {
        "bob": "JupyterLab of bob moved to pc10.lab: its container here stays stopped",
        "alice": "JupyterLab of alice moves to pc09.lab in this run: its container here is stopped",
    }


def test_an_old_container_whose_busy_check_is_missing_is_not_stopped(fake_host_in):
    unchecked = {"checked": False, "busy": False, "reasons": [], "notes": []}
    fake, commands = _stop(
        fake_host_in, {MarkerFact: {"alice": None}, ComposeService: RUNNING, ContainerBusy: unchecked}
    )
    assert commands == []
    assert fake.noops == ["the cut-over of alice to pc09.lab waits: the busy check is not installed here yet"]

    peer = _Peer("pc03.lab", {MarkerFact: {"alice": None}, ComposeService: RUNNING, ContainerBusy: unchecked})
    _, commands = _pull(fake_host_in, CHANGED, peers=[peer], final=True)
    assert "its JupyterLab there is busy (the busy check is not installed there yet)" in _fails_with(commands)


def test_a_cut_over_that_found_the_old_container_not_stopped_says_so():
    assert migrate.cut_over_refusal("pc09.lab", "alice", "pc03.lab", None, []) == (
        "host pc09.lab: the cut-over of alice from pc03.lab did not happen: it was not stopped; nothing was moved, "
        "and JupyterLab of alice stays on pc03.lab; run again once it is idle, or stop it now with "
        "--data jupyter_update=now"
    )


def test_the_old_container_keeps_running_when_the_new_pc_failed_in_this_run(fake_host_in):
    fake, commands = _stop(
        fake_host_in, {MarkerFact: {"alice": None}, ComposeService: RUNNING}, force=True, failed=["pc09.lab"]
    )
    assert commands == []
    assert fake.noops == ["the cut-over of alice to pc09.lab waits: pc09.lab failed earlier in this run"]
