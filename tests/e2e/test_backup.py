"""Backups to another test host over SFTP with the distribution's restic, and a restore onto a fresh host.

One story on three test hosts, so CI pays for two JupyterLab bring-ups:

1. the backup server (NAS) is a plain test host: an account with a directory, whose
   authorized_keys lets the lab's backup key (backup_ssh_key, made on the controller) run
   sftp-server and nothing else, which is what the README tells the admin to do;
2. a deploy of a PC whose workspace and home hold nested, hidden, spaced and non-ASCII names,
   a symlink and a 1 MiB file: the timer is armed, the password file is 0600 root and shows in
   no output; a second run changes nothing;
3. the test starts the backup service: the repository has a snapshot of the workspace and one
   of the home, taken with --host <the PC> and tagged with the user; the status shows its age
   and size and no drift;
4. the NAS's sshd stopped, the backup fails and the status reports it, with ssh's reason;
5. the PC is destroyed; a fresh test host takes its name, with the user at another UID and a
   file already in the workspace; the deploy with restore_from = "backup" brings every
   file back before JupyterLab starts, owned by the user by name, keeps the file that was
   there, and a second run changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex

import pytest

from .harness.hosts import generate_keypair, host_exec
from .harness.runner import assert_converged, assert_no_changes
from .probes import bridge_ip, health

WORKSPACE = "/srv/workspace/lab"
HOME = "/srv/home/lab"
RESTIC = "/opt/labfleet/backup/labfleet-restic"
NEW_UID = 1077
RESTORE_STEP = "Restore the workspaces and homes from the backup"

# Relative path -> content; the 1 MiB file is made on the host.
FILES = {
    "nested/a/b/c/deep.txt": "deep\n",
    ".hidden/config": "hidden=1\n",
    "name with spaces.txt": "spaces\n",
    "données/résumé ü.txt": "non-ascii\n",
    "notebook.ipynb": '{"cells": []}\n',
}
HOME_FILES = {
    ".ssh/id_lab": "not a real key\n",
    ".config/jupyter/lab.json": "{}\n",
    "notes é.md": "notes\n",
}
PLACED = "name with spaces.txt"
# The running Jupyter server's own files in HOME (jpserver-<pid>.json and the like).
RUNTIME = ".local/share/jupyter/runtime/"


def _plant(host) -> None:
    lines = ["set -e"]
    for base, files in ((WORKSPACE, FILES), (HOME, HOME_FILES)):
        for relative, text in files.items():
            path = shlex.quote(f"{base}/{relative}")
            lines.append(f'mkdir -p "$(dirname {path})" && printf %s {shlex.quote(text)} > {path}')
    lines += [
        f"head -c 1048576 /dev/urandom > {WORKSPACE}/data.bin",
        f"ln -s nested/a {WORKSPACE}/link-to-a",
        f"chmod 700 {HOME}/.ssh && chmod 600 {HOME}/.ssh/id_lab",
        f"chown -R lab:lab {WORKSPACE} {HOME}",
    ]
    host_exec(host, "\n".join(lines))


def _checksums(host, base: str) -> dict[str, str]:
    """Relative path -> sha256 (files) or '-> target' (symlinks), under base."""
    script = (
        f"cd {base} && find . -type f -print0 | xargs -0 -r sha256sum && "
        "find . -type l -printf '%l  %p\\n' | sed 's/^/-> /'"
    )
    out = {}
    for line in host_exec(host, script).stdout.splitlines():
        digest, _, path = line.partition("  ")
        out[path.removeprefix("./")] = digest
    return out


def _status(pyinfra_run, host, data, drift: bool = False) -> tuple[int, dict]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABFLEET_STATUS_FORMAT", "json")
        result = pyinfra_run([host], deploy="status.py", data=data, expect_fail=drift)
    document, _ = json.JSONDecoder().raw_decode(result.stdout.lstrip())
    return result.rc, document


def test_backup_to_an_sftp_server_then_restore_onto_a_fresh_host(make_hosts, fleet, pyinfra_run, lab_data, tmp_path):
    pc, nas = make_hosts(2, engine=True)
    password = f"restic-{secrets.token_hex(16)}"
    password_file = tmp_path / "restic-password"
    password_file.write_text(password + "\n")
    key = generate_keypair(tmp_path / "backup-key")

    # 1. The NAS, as the README has the admin prepare it.
    authorised = f'restrict,command="/usr/lib/openssh/sftp-server" {key.with_suffix(".pub").read_text().strip()}'
    host_exec(
        nas, "install -d -o lab -g lab /srv/restic && cat >> /home/lab/.ssh/authorized_keys", input=authorised + "\n"
    )
    data = {
        **lab_data,
        "backup_repository": f"sftp:lab@{bridge_ip(nas)}:/srv/restic/lab",
        "backup_password_file": str(password_file),
        "backup_ssh_key": str(key),
        "backup_schedule": "*-*-* 03:00",
    }

    # 2. The PC, with work in its workspace and home, deployed: the timer is armed.
    host_exec(pc, f"install -d -o lab -g lab {WORKSPACE} {HOME}")
    _plant(pc)
    runs = [pyinfra_run([pc], data=data)]
    assert_converged(runs[-1])
    assert runs[-1].status(pc, "Check the backup repository") == "success"
    timer = host_exec(pc, "systemctl is-enabled labfleet-backup.timer; systemctl is-active labfleet-backup.timer")
    assert timer.stdout.split() == ["enabled", "active"]
    calendar = host_exec(pc, "systemctl show -p TimersCalendar --value labfleet-backup.timer").stdout
    assert "OnCalendar=*-*-* 03:00:00" in calendar, calendar
    secrets_mode = host_exec(
        pc, "stat -c '%n %U %a' /etc/labfleet/backup /etc/labfleet/backup/password /etc/labfleet/backup/ssh_key"
    ).stdout.splitlines()
    assert secrets_mode == [
        "/etc/labfleet/backup root 700",
        "/etc/labfleet/backup/password root 600",
        "/etc/labfleet/backup/ssh_key root 600",
    ]
    assert host_exec(nas, "test -f /srv/restic/lab/config && echo made").stdout.strip() == "made"
    runs.append(pyinfra_run([pc], data=data))
    assert_no_changes(runs[-1])

    # 3. The timer's service, started by hand: one snapshot per directory, tagged with host and user.
    host_exec(pc, "systemctl start labfleet-backup.service", timeout=600)
    listed = json.loads(host_exec(pc, f"{RESTIC} snapshots --json").stdout)
    assert sorted((s["hostname"], tuple(s["paths"]), tuple(sorted(s["tags"]))) for s in listed) == [
        (pc.name, (HOME,), ("kind:home", "labfleet", "user:lab")),
        (pc.name, (WORKSPACE,), ("kind:workspace", "labfleet", "user:lab")),
    ]
    before = {"workspace": _checksums(pc, WORKSPACE), "home": _checksums(pc, HOME)}
    assert {"nested/a/b/c/deep.txt", "données/résumé ü.txt", ".hidden/config", "data.bin"} <= set(before["workspace"])
    assert before["workspace"]["link-to-a"] == "-> nested/a"
    assert set(HOME_FILES) <= set(before["home"])
    rc, document = _status(pyinfra_run, pc, data)
    row = document["hosts"][0]["backup"]
    assert rc == 0 and document["ok"] is True, document["drift"]
    assert row["failed"] is None and row["age"] is not None and row["bytes"] > 1048576

    # 4. The NAS unreachable at backup time: the run fails, and the status says why.
    host_exec(nas, "systemctl stop ssh.socket ssh.service")
    failed = host_exec(pc, "systemctl start labfleet-backup.service", check=False, timeout=600)
    assert failed.returncode != 0
    rc, document = _status(pyinfra_run, pc, data, drift=True)
    assert rc == 1 and document["ok"] is False
    (reason,) = document["drift"][pc.name]
    assert reason.startswith("the last backup failed (") and "Connection refused" in reason, reason
    host_exec(nas, "systemctl start ssh.service")

    # 5. The PC dies. A fresh host takes its name (lab at another UID, one file already there) and
    #    restores its own snapshots; another fresh host, under its own name, restores the dead
    #    PC's snapshots (restore_from = "backup:<dead PC>"). One run deploys both.
    fleet.remove([pc])
    fresh, other = make_hosts(2, engine=True)
    new = dataclasses.replace(fresh, name=pc.name)
    host_exec(new, f"usermod -u {NEW_UID} lab && groupmod -g {NEW_UID} lab && chown -R lab:lab /home/lab")
    host_exec(new, f"install -d -o lab -g lab {WORKSPACE} && echo placed > '{WORKSPACE}/{PLACED}'")
    host_exec(new, f"chown lab:lab '{WORKSPACE}/{PLACED}'")
    restores = {new.name: {"restore_from": "backup"}, other.name: {"restore_from": f"backup:{pc.name}"}}
    runs.append(pyinfra_run([new, other], data=data, host_data=restores))
    assert_converged(runs[-1])
    for host in (new, other):
        source = restores[host.name]["restore_from"]
        for kind in ("workspace", "home"):
            # In full: the two hosts' operations differ by name only, one pyinfra operation with both names.
            name = f"{RESTORE_STEP} | Restore the {kind} of lab from {source}"
            assert runs[-1].status(host, name) == "success", name
        assert health(host) == "healthy"
        after = {"workspace": _checksums(host, WORKSPACE), "home": _checksums(host, HOME)}
        for kind, files in before.items():
            for path, digest in files.items():
                # The pre-placed file is kept; the server that came up rewrites its own runtime files.
                if (host, kind, path) == (new, "workspace", PLACED) or path.startswith(RUNTIME):
                    continue
                assert after[kind].get(path) == digest, (
                    f"{host.name} {kind} {path}: {after[kind].get(path)} != {digest}"
                )
        uid = host_exec(host, "id -u lab").stdout.strip()
        owners = host_exec(host, f"find {WORKSPACE} {HOME} ! -uid {uid} -printf '%u %p\\n'").stdout
        assert owners == "", f"{host.name}: files not owned by lab ({uid}):\n{owners}"
        assert host_exec(host, "ls -A /srv/workspace /srv/home").stdout.count(".labfleet-restore") == 0
    assert host_exec(new, "id -u lab").stdout.strip() == str(NEW_UID)
    assert host_exec(new, f"cat '{WORKSPACE}/{PLACED}'").stdout == "placed\n", "the restore replaced a file"
    runs.append(pyinfra_run([new, other], data=data, host_data=restores))
    assert_no_changes(runs[-1])

    # Neither the password nor the SSH key ever shows in pyinfra's output.
    assert not [i for i, run in enumerate(runs) if password in run.stdout + run.stderr]
    key_body = key.read_text().splitlines()[1]
    assert not [i for i, run in enumerate(runs) if key_body in run.stdout + run.stderr]
