"""Backups and restores (labfleet/backup.py, labfleet/restore.py): settings, scripts and units, facts, status."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from labfleet import backup, restore
from labfleet.facts import backup as facts
from labfleet.model import Repository
from labfleet.settings import SettingsError, build

PASSWORD = "/etc/hostname"  # any file the controller has


def with_backups(raw, **extra):
    raw.update({"backup_repository": "sftp:backup@nas.lab:/srv/restic", "backup_password_file": PASSWORD, **extra})
    return raw


BAD = [
    ("backup_repository", "s3:s3.lab/restic", "s3: repositories are not supported"),
    ("backup_repository", "rest:http://nas.lab:8000/", "rest: repositories are not supported"),
    ("backup_repository", "sftp:backup@nas.lab", "sftp: needs host:/path"),
    ("backup_repository", "sftp:/srv/restic", "sftp: needs host:/path"),
    ("backup_repository", "sftp:backup@nas.lab:srv/restic", "not an absolute path"),
    ("backup_repository", "sftp:backup@nas lab:/srv/restic", "not an IP address or a DNS name"),
    ("backup_repository", "sftp://nas.lab/srv/restic", "double slash"),
    ("backup_repository", "sftp://nas.lab:99999//srv/restic", "bad port"),
    ("backup_repository", "restic/lab", "not an absolute path nor an sftp: URL"),
    ("backup_repository", "local:restic", "not an absolute path"),
    ("backup_repository", "/mnt/back up", "without spaces"),
    ("backup_repository", "/mnt/../etc", "without spaces, quotes or .."),
    ("backup_repository", 42, "not a non-empty string"),
    ("backup_password_file", "/nonexistent/restic-password", "no such file on the controller"),
    ("backup_ssh_key", "/nonexistent/id_backup", "no such file on the controller"),
    ("backup_schedule", "every night", "systemd calendar"),
    ("backup_schedule", "*-*-* 25:00", "bad value '25'"),
    ("backup_schedule", "Mon..Xyz 02:00", "bad weekday"),
    ("backup_schedule", "*-*-* 02:*", "minutes must be numbers"),
    ("backup_schedule", "*-*-* 02:00:30", "HH:MM or HH:MM:00"),
    ("backup_schedule", "2026-*-* 02:00", "systemd calendar"),
    ("backup_schedule", "", "not a non-empty string"),
    ("backup_keep", ["daily", 7], "not a non-empty mapping"),
    ("backup_keep", {}, "not a non-empty mapping"),
    ("backup_keep", {"daily": 0}, "daily = 0 is not a count >= 1"),
    ("backup_keep", {"daily": "7"}, "daily = '7' is not a count >= 1"),
    ("backup_keep", {"daily": True}, "daily = True is not a count >= 1"),
    ("backup_keep", {"dayly": 7}, "unknown kind 'dayly'"),
    ("restore_from", "pc03.lab", '"backup:<host>"'),
    ("restore_from", "backup:", '"backup:<host>"'),
    ("restore_from", "backup:pc 03", '"backup:<host>"'),
    ("restore_from", "Backup", '"backup:<host>"'),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_backup_value_names_host_key_value_and_form(raw, key, value, expected):
    with_backups(raw)[key] = value
    with pytest.raises(SettingsError) as err:
        build("pc07", raw)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"host pc07: {key} = {value!r} is invalid"), message
    assert expected in message


REPOSITORIES = [
    ("/mnt/backup/restic", Repository("local", "/mnt/backup/restic", "/mnt/backup/restic")),
    ("local:/mnt/restic", Repository("local", "local:/mnt/restic", "/mnt/restic")),
    ("sftp:nas.lab:/srv/restic", Repository("sftp", "sftp:nas.lab:/srv/restic", "/srv/restic", "nas.lab")),
    (
        "sftp:backup@10.0.0.5:/srv/restic",
        Repository("sftp", "sftp:backup@10.0.0.5:/srv/restic", "/srv/restic", "10.0.0.5", "backup"),
    ),
    (
        "sftp://backup@nas.lab:2222//srv/restic",
        Repository("sftp", "sftp://backup@nas.lab:2222//srv/restic", "/srv/restic", "nas.lab", "backup", 2222),
    ),
]


@pytest.mark.parametrize(("text", "parsed"), REPOSITORIES, ids=[text for text, _ in REPOSITORIES])
def test_repository_forms_are_parsed_once(raw, text, parsed):
    assert build("pc07", with_backups(raw, backup_repository=text)).backup_repository == parsed


SCHEDULES = [
    ("daily", 86400),
    ("hourly", 3600),
    ("weekly", 7 * 86400),
    ("*-*-* 02:30", 86400),
    ("*-*-* 02:30:00", 86400),
    ("02:30", 86400),
    ("*-*-* 0,12:00", 12 * 3600),
    ("*-*-* 0/6:15", 6 * 3600),
    ("*-*-* *:00", 3600),
    # Friday 22:00 to Monday 22:00 is the longest wait.
    ("Mon..Fri 22:00", 3 * 86400),
    ("Sat,Sun *-*-* 03:00", 6 * 86400),
    ("Fri..Mon 01:00", 4 * 86400),
]


@pytest.mark.parametrize(("text", "period"), SCHEDULES, ids=[text for text, _ in SCHEDULES])
def test_schedule_period_is_the_longest_wait_between_runs(raw, text, period):
    schedule = build("pc07", with_backups(raw, backup_schedule=text)).backup_schedule
    assert (schedule.text, schedule.period) == (text, period)


def test_keep_follows_restics_order(raw):
    s = build("pc07", with_backups(raw, backup_keep={"monthly": 6, "last": 3, "daily": 7}))
    assert s.backup_keep == (("last", 3), ("daily", 7), ("monthly", 6))
    assert backup.keep_options(s) == "--keep-last 3 --keep-daily 7 --keep-monthly 6"


def test_a_repository_needs_a_password_file(raw):
    raw["backup_repository"] = "/mnt/restic"
    with pytest.raises(SettingsError) as err:
        build("pc07", raw)
    assert str(err.value) == (
        "host pc07: backup_password_file = None is invalid with backup_repository = '/mnt/restic'; "
        "expected a file on the controller holding the restic password (e.g. ~/.config/labfleet/restic-password)"
    )


def test_a_restore_needs_a_repository(raw):
    raw["restore_from"] = "backup:pc03.lab"
    with pytest.raises(SettingsError) as err:
        build("pc07", raw)
    assert str(err.value).startswith("host pc07: restore_from = 'backup:pc03.lab' is invalid without backup_repository")


def test_restore_source_is_this_host_or_the_named_one(raw):
    assert restore.restore_source(build("pc07", with_backups(raw, restore_from="backup"))) == "pc07"
    assert restore.restore_source(build("pc07", with_backups(raw, restore_from="backup:pc03.lab"))) == "pc03.lab"
    assert restore.restore_source(build("pc07", with_backups(raw, restore_from=None))) is None


# --- What is written on the host ------------------------------------------------------------------


def test_the_wrapper_names_the_repository_and_the_password_file_never_the_password(raw, tmp_path):
    secret = tmp_path / "restic-password"
    secret.write_text("hunter2-restic\n")
    key = tmp_path / "id_backup"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    s = build("pc07", with_backups(raw, backup_password_file=str(secret), backup_ssh_key=str(key)))
    wrapper = backup.restic_wrapper(s)
    assert "hunter2" not in wrapper
    assert "export RESTIC_REPOSITORY=sftp:backup@nas.lab:/srv/restic\n" in wrapper
    assert f"export RESTIC_PASSWORD_FILE={backup.PASSWORD_FILE}\n" in wrapper
    sftp = backup.sftp_command(s)
    assert sftp is not None
    assert sftp.endswith("-i /etc/labfleet/backup/ssh_key -o IdentitiesOnly=yes -l backup nas.lab -s sftp")
    assert "StrictHostKeyChecking=accept-new" in sftp and f"UserKnownHostsFile={backup.KNOWN_HOSTS}" in sftp
    assert backup.controller_files(s) == {backup.PASSWORD_FILE: str(secret), backup.SSH_KEY: str(key)}


def test_a_local_repository_needs_no_ssh(raw):
    s = build("pc07", with_backups(raw, backup_repository="/mnt/restic"))
    assert backup.sftp_command(s) is None
    assert "sftp.command" not in backup.restic_wrapper(s)
    assert backup.packages(s) == ["restic"]


def test_the_timer_runs_on_the_schedule_and_the_service_runs_the_script(raw):
    s = build("pc07", with_backups(raw, backup_schedule="Mon..Fri 22:00"))
    timer = backup.timer_text(s)
    assert "OnCalendar=Mon..Fri 22:00\n" in timer and "Persistent=true\n" in timer
    assert "RandomizedDelaySec=1800\n" in timer
    assert f"ExecStart={backup.BACKUP_SCRIPT}\n" in backup.service_text(s)


def test_the_backup_script_is_valid_sh_and_backs_up_each_users_workspace_and_home(raw):
    s = build("pc07", with_backups(raw, jupyter_users=["alice", {"name": "bob", "home_dir": "/data/bob home"}]))
    script = backup.backup_script(s)
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    assert "one alice workspace /srv/workspace/alice\n" in script
    assert "one alice home /srv/home/alice\n" in script
    assert "one bob home '/data/bob home'\n" in script
    assert "--keep-daily 7 --keep-weekly 4 --keep-monthly 6" in script
    assert '--host "$host" --tag labfleet' in script


RESTIC_STANDIN = """#!/bin/sh
# A stand-in for labfleet-restic in a unit test: prints what restic 0.18 prints, or fails like an unreachable server.
echo "$@" >> "$LOG"
case "$1" in
  backup)
    if [ "${FAIL:-}" = ssh ]; then
      echo "ssh: connect to host 10.0.0.5 port 22: Connection refused" >&2
      echo 'Fatal: unable to open repository at sftp:b@10.0.0.5:/r: "unexpected EOF"' >&2
      exit 1
    fi
    if [ "${FAIL:-}" = silent ]; then echo "killed" >&2; exit 137; fi
    echo '{"message_type":"status","percent_done":0.5}'
    echo '{"message_type":"summary","files_new":3,"total_bytes_processed":1000,"snapshot_id":"abc123"}' ;;
  forget)
    if [ "${FAIL:-}" = forget ]; then
      echo "Fatal: unable to create lock in backend: locked exclusively" >&2; exit 1
    fi ;;
esac
"""


def _run_backup_script(raw, tmp_path, fail: str, parent: str = "ws"):
    workspace = str(tmp_path / parent / "{user}")
    s = build("pc07", with_backups(raw, workspace_dir=workspace, home_dir="/nonexistent/{user}"))
    (tmp_path / parent / "alice").mkdir(parents=True)
    standin = tmp_path / "restic"
    standin.write_text(RESTIC_STANDIN)
    standin.chmod(0o755)
    state = tmp_path / "state"
    script = backup.backup_script(s).replace(facts.RESTIC, str(standin)).replace(facts.STATE_DIR, str(state))
    env = {"PATH": "/usr/bin:/bin", "LOG": str(tmp_path / "log"), "FAIL": fail}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=False)
    return done, state, (tmp_path / "log").read_text()


def test_a_backup_run_leaves_restics_summary_for_the_status(raw, tmp_path):
    done, state, log = _run_backup_script(raw, tmp_path, fail="")
    assert done.returncode == 0, done.stderr
    success = json.loads((state / "last-success.json").read_text())
    assert success["snapshots"] == [
        {
            "user": "alice",
            "kind": "workspace",
            "path": str(tmp_path / "ws" / "alice"),
            "summary": {
                "message_type": "summary",
                "files_new": 3,
                "total_bytes_processed": 1000,
                "snapshot_id": "abc123",
            },
        }
    ]
    assert json.loads((state / "last-run.json").read_text())["ok"] is True
    # The missing home is skipped; this host's snapshots alone are forgotten, by user and directory.
    assert "forget --host pc07 --tag labfleet --group-by host,tags --keep-daily 7" in log
    assert log.count("backup --json") == 1


def test_the_summary_stays_json_whatever_the_path_holds(raw, tmp_path):
    done, state, _ = _run_backup_script(raw, tmp_path, fail="", parent='say "hi" \\ é')
    assert done.returncode == 0, done.stderr
    (snapshot,) = json.loads((state / "last-success.json").read_text())["snapshots"]
    assert snapshot["path"] == str(tmp_path / 'say "hi" \\ é' / "alice")


def test_a_failed_backup_run_says_why_and_keeps_the_last_success(raw, tmp_path):
    done, state, log = _run_backup_script(raw, tmp_path, fail="ssh")
    assert done.returncode == 1
    run = json.loads((state / "last-run.json").read_text())
    assert run["ok"] is False
    assert run["error"].startswith("alice workspace: ssh: connect to host 10.0.0.5 port 22: Connection refused")
    assert not (state / "last-success.json").exists()
    assert "forget" not in log


def test_a_backup_that_dies_without_a_reason_says_how_it_exited_and_a_failed_retention_says_so(raw, tmp_path):
    done, state, _ = _run_backup_script(raw, tmp_path / "silent", fail="silent")
    assert done.returncode == 1
    assert json.loads((state / "last-run.json").read_text())["error"] == "alice workspace: restic exited 137"
    assert done.stderr == "labfleet-backup: alice workspace: restic exited 137\n"

    done, state, log = _run_backup_script(raw, tmp_path / "forget", fail="forget")
    assert done.returncode == 1 and "forget" in log
    error = json.loads((state / "last-run.json").read_text())["error"]
    assert error.startswith("retention: Fatal: unable to create lock in backend: locked exclusively"), error
    assert not (state / "last-success.json").exists()


# --- Facts --------------------------------------------------------------------------------------


def test_repository_states():
    assert facts.parse_repository([]) == {"state": "unavailable", "error": ""}
    assert facts.parse_repository(["exit 0"]) == {"state": "exists", "error": ""}
    missing = facts.parse_repository(["Fatal: repository does not exist: unable to open config file", "exit 10"])
    assert missing["state"] == "missing"
    old_restic = ["Is there a repository at the following location?", "sftp:b@nas:/r", "exit 1"]
    assert facts.parse_repository(old_restic)["state"] == "missing"
    error = facts.parse_repository(
        ["ssh: connect to host nas port 22: Connection refused", "Fatal: unable to open repository", "exit 1"]
    )
    assert error == {
        "state": "error",
        "error": "ssh: connect to host nas port 22: Connection refused; Fatal: unable to open repository",
    }


SNAPSHOTS = [
    {"id": "a1", "time": "2026-12-01T02:00:00+00:00", "hostname": "pc03", "paths": ["/srv/workspace/alice"],
     "tags": ["labfleet", "user:alice", "kind:workspace"]},
    {"id": "a2", "time": "2026-12-02T02:00:00+00:00", "hostname": "pc03", "paths": ["/srv/workspace/alice"],
     "tags": ["labfleet", "user:alice", "kind:workspace"]},
    {"id": "h1", "time": "2026-12-02T02:00:01+00:00", "hostname": "pc03", "paths": ["/srv/home/alice"],
     "tags": ["labfleet", "user:alice", "kind:home"]},
]  # fmt: skip


def test_snapshots_are_parsed_and_the_latest_per_user_and_kind_chosen():
    found = facts.parse_snapshots([json.dumps(SNAPSHOTS), "exit 0"])
    assert found["state"] == "read" and len(found["snapshots"]) == 3
    latest = facts.latest(found["snapshots"], "alice", "workspace")
    assert latest is not None and latest["id"] == "a2"
    home = facts.latest(found["snapshots"], "alice", "home")
    assert home is not None and home["id"] == "h1"
    assert facts.latest(found["snapshots"], "bob", "home") is None
    assert facts.parse_snapshots(["Fatal: wrong password or no key found", "exit 12"]) == {
        "state": "error",
        "error": "Fatal: wrong password or no key found",
        "snapshots": [],
    }
    assert facts.parse_snapshots([])["state"] == "unavailable"


def test_summary_files_are_parsed():
    success = {"time": 1000, "snapshots": [{"summary": {"total_bytes_processed": 5}}, {"summary": None}]}
    found = facts.parse_summary(
        ["now 4600", "since 900", 'last_run {"time": 1000, "ok": true}', f"last_success {json.dumps(success)}"]
    )
    assert found == {"now": 4600, "since": 900, "last_run": {"time": 1000, "ok": True}, "last_success": success}
    assert facts.backup_bytes(found["last_success"]) == 5
    assert facts.parse_summary(["now 1", "last_run {broken"])["last_run"] == {
        "time": None,
        "ok": False,
        "error": "last-run.json is not JSON",
    }


# --- Status ------------------------------------------------------------------------------------


def _row(raw, now=None, since=None, run=None, success=None, schedule="daily"):
    s = build("pc07", with_backups(raw, backup_schedule=schedule))
    summary = facts.BackupSummaryState(now=now, since=since, last_run=run, last_success=success)
    return backup.status_row(s, summary)


def test_a_recent_backup_is_fine_and_shows_age_and_size(raw):
    success = {"time": 100_000, "snapshots": [{"summary": {"total_bytes_processed": 3 * 2**30}}]}
    row = _row(raw, now=100_000 + 7200, since=1, run={"time": 100_000, "ok": True}, success=success)
    assert backup.status_reasons(row) == []
    assert backup.status_cell(row) == "2h00m ago 3.0G"


def test_a_backup_older_than_twice_the_schedule_is_drift(raw):
    success = {"time": 0, "snapshots": []}
    row = _row(raw, now=2 * 86400 + 1, since=0, run={"time": 0, "ok": True}, success=success)
    assert backup.status_reasons(row) == ["the last backup is 2d00h old, more than twice backup_schedule 'daily'"]
    assert _row(raw, now=2 * 86400, since=0, run={"time": 0, "ok": True}, success=success) is not None
    assert backup.status_reasons(_row(raw, now=2 * 86400, since=0, success=success)) == []


def test_a_failed_backup_is_drift_with_its_reason(raw):
    run = {"time": 1000, "ok": False, "error": "alice workspace: ssh: connect to host nas port 22: Connection refused"}
    row = _row(raw, now=1600, since=0, run=run)
    assert backup.status_reasons(row) == [
        "the last backup failed (10m ago): alice workspace: ssh: connect to host nas port 22: Connection refused"
    ]
    assert backup.status_cell(row) == "none yet (failed)"


def test_no_backup_yet_is_drift_only_after_twice_the_schedule(raw):
    assert backup.status_reasons(_row(raw, now=3600, since=0, schedule="hourly")) == []
    assert backup.status_reasons(_row(raw, now=7201, since=0, schedule="hourly")) == [
        "no backup since they were set up 2h00m ago (backup_schedule 'hourly')"
    ]
    assert backup.status_reasons(_row(raw, now=10)) == ["backups are not set up on this host yet; run the deploy"]


def test_no_backup_settings_no_backup_status(raw):
    s = build("pc07", raw)
    assert backup.status_row(s, facts.BackupSummary.default()) is None
    assert backup.status_reasons(None) == [] and backup.status_cell(None) == "-"


RESTORE_STANDIN = """#!/bin/sh
# restic restore ID --target DIR: the snapshot of $SNAPSHOT_OF, as restic lays it out under DIR.
[ "$1" = restore ] || exit 9
while [ "$1" != --target ]; do shift; done
mkdir -p "$2$SNAPSHOT_OF" && cp -a "$SNAPSHOT"/. "$2$SNAPSHOT_OF"/
"""

# The first attempt "dies" while it copies in: half of big.bin is written, then tar is gone.
DYING_TAR = """#!/bin/sh
case " $* " in
  *" -xpf "*) cat >/dev/null; head -c 1000 "$SNAPSHOT/big.bin" > "$2/big.bin"; exit 1 ;;
esac
exec /usr/bin/tar "$@"
"""


def _restore_for_real(tmp_path, kill_first: bool) -> tuple[Path, Path, list[subprocess.CompletedProcess]]:
    """restore_command run by bash against a stand-in restic, as this test's own user (chown to oneself)."""
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    snap, target, state, bin_dir = (tmp_path / name for name in ("snap", "home", "state", "bin"))
    for directory in (snap / "sub", snap / "mine", snap / "link", target / "mine", bin_dir):
        directory.mkdir(parents=True)
    (snap / "big.bin").write_bytes(os.urandom(100_000))
    (snap / "keep.txt").write_text("from the backup\n")
    (snap / "sub" / "é x.txt").write_text("nested\n")
    (snap / "mine" / "new.txt").write_text("new inside an existing directory\n")
    (snap / "link" / "through.txt").write_text("must not land where the link points\n")
    (target / "keep.txt").write_text("the researcher's\n")
    (target / "mine").chmod(0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (target / "link").symlink_to(elsewhere)
    (bin_dir / "restic").write_text(RESTORE_STANDIN)
    (bin_dir / "tar").write_text(DYING_TAR)
    for tool in ("restic", "tar"):
        (bin_dir / tool).chmod(0o755)
    kept = str(state / "restored-me-home.kept")
    command = restore.restore_command("a2", "/srv/home/me", str(target), user, group, kept)
    command = command.replace(facts.RESTIC, str(bin_dir / "restic"))
    env = {"PATH": "/usr/bin:/bin", "SNAPSHOT": str(snap), "SNAPSHOT_OF": "/srv/home/me"}
    runs = []
    if kill_first:
        dying = {**env, "PATH": f"{bin_dir}:/usr/bin:/bin"}
        runs.append(subprocess.run(["bash", "-c", command], env=dying, capture_output=True, text=True, check=False))
        assert runs[0].returncode != 0 and (target / "big.bin").stat().st_size == 1000
        assert (state / "restored-me-home.kept").exists()
    runs.append(subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=False))
    return snap, target, runs


@pytest.mark.parametrize("kill_first", [False, True], ids=["one-attempt", "after-an-interrupted-attempt"])
def test_the_restore_copies_what_is_missing_and_never_replaces_or_writes_through_what_was_there(tmp_path, kill_first):
    snap, target, runs = _restore_for_real(tmp_path, kill_first)
    assert runs[-1].returncode == 0, runs[-1].stderr
    # Written whole, even the file a dead attempt left half-written (it was not there before).
    assert (target / "big.bin").read_bytes() == (snap / "big.bin").read_bytes()
    assert (target / "sub" / "é x.txt").read_text() == "nested\n"
    assert (target / "mine" / "new.txt").exists()
    # What was there before the first attempt is untouched: content, a directory's mode, a symlink's target.
    assert (target / "keep.txt").read_text() == "the researcher's\n"
    assert (target / "mine").stat().st_mode & 0o777 == 0o700
    assert (target / "link").is_symlink() and list((tmp_path / "elsewhere").iterdir()) == []
    # No staging directory and no list left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == ["bin", "elsewhere", "home", "snap", "state"]
    assert list((tmp_path / "state").iterdir()) == []


def test_the_restore_command_gives_everything_to_the_user_by_name():
    command = restore.restore_command("a2", "/srv/workspace/alice", "/srv/workspace/alice", "alice", "alice", "/k")
    assert "--target /srv/workspace/.labfleet-restore-alice" in command
    assert "chown -R -h alice:alice /srv/workspace/.labfleet-restore-alice" in command
    assert "set -eo pipefail" in command


# --- Operations, against canned facts ------------------------------------------------------------


def _check(fake_host_in, found):
    fake = fake_host_in(backup, {facts.ResticRepository: found})
    commands = list(backup.check_repository._inner("sftp:b@nas:/r", backup.CHECKED, "check that nas is reachable"))
    return fake, commands


def test_an_existing_repository_is_only_noted(fake_host_in):
    _, commands = _check(fake_host_in, {"state": "exists", "error": ""})
    assert len(commands) == 1 and "restic" not in commands[0] and backup.CHECKED in commands[0]


def test_a_missing_repository_is_made(fake_host_in):
    _, commands = _check(fake_host_in, {"state": "missing", "error": ""})
    assert commands[0].startswith(f"{facts.RESTIC} init >/dev/null && ")


def test_a_repository_that_cannot_be_opened_fails_the_host_with_restics_reason(fake_host_in):
    _, commands = _check(fake_host_in, {"state": "error", "error": "ssh: connect to host nas port 22: No route"})
    assert commands == [
        "echo 'labfleet: host pc01: cannot open the backup repository sftp:b@nas:/r: ssh: connect to host nas "
        "port 22: No route; check that nas is reachable, then run the deploy again' >&2; exit 1"
    ]


def test_the_key_hint_names_the_account_and_the_key(raw):
    s = build("pc07", with_backups(raw, backup_ssh_key=PASSWORD))
    assert backup.key_hint(s) == (
        f"check that nas.lab is reachable and that backup@nas.lab accepts the public key of backup_ssh_key "
        f"({PASSWORD}.pub) in its authorized_keys"
    )
    local = build("pc07", with_backups(raw, backup_repository="/mnt/restic", backup_ssh_key=None))
    assert backup.key_hint(local) == "check that the repository's directory is mounted and writable by root"


def _restore(fake_host_in, monkeypatch, found, user="alice", kind="workspace"):
    fake_host_in(restore, {facts.ResticSnapshots: found})
    warnings: list[str] = []
    monkeypatch.setattr(restore, "logger", SimpleLogger(warnings))
    commands = list(
        restore.restore_directory._inner(
            "pc03", user, user, kind, f"/srv/{kind}/{user}", restore.restored_marker(user, kind), "backup:pc03\n"
        )
    )
    return commands, warnings


class SimpleLogger:
    def __init__(self, lines):
        self.lines = lines

    def warning(self, line):
        self.lines.append(line)


def test_the_newest_snapshot_is_restored_then_marked(fake_host_in, monkeypatch):
    found = facts.parse_snapshots([json.dumps(SNAPSHOTS), "exit 0"])
    commands, warnings = _restore(fake_host_in, monkeypatch, found)
    assert len(commands) == 1 and warnings == []
    assert (
        commands[0].startswith("bash -c ")
        and "restore --retry-lock 10m a2 --target /srv/workspace/.labfleet-restore-alice" in commands[0]
    )
    assert commands[0].endswith(f"> {restore.restored_marker('alice', 'workspace')}")


def test_a_user_without_a_snapshot_is_said_and_marked(fake_host_in, monkeypatch):
    found = facts.parse_snapshots([json.dumps(SNAPSHOTS), "exit 0"])
    commands, warnings = _restore(fake_host_in, monkeypatch, found, user="bob")
    assert warnings == ["[pc01] no snapshot of the workspace of bob from pc03: nothing to restore there"]
    assert len(commands) == 1 and "restic" not in commands[0]


def test_a_host_without_snapshots_fails_with_what_to_check(fake_host_in, monkeypatch):
    commands, _ = _restore(fake_host_in, monkeypatch, {"state": "read", "error": "", "snapshots": []})
    assert commands == [
        "echo 'labfleet: host pc01: restore_from names pc03, but the backup repository holds no labfleet snapshot "
        "taken on pc03; check the name (restic snapshots lists the hosts) or remove restore_from' >&2; exit 1"
    ]


def test_snapshots_that_cannot_be_listed_fail_the_host(fake_host_in, monkeypatch):
    commands, _ = _restore(
        fake_host_in, monkeypatch, {"state": "error", "error": "Fatal: wrong password", "snapshots": []}
    )
    assert commands == [
        "echo 'labfleet: host pc01: cannot list the snapshots of pc03 to restore the workspace of alice: "
        "Fatal: wrong password; fix the repository'\"'\"'s access (see the backup step above), then run the "
        "deploy again' >&2; exit 1"
    ]
