"""Backups of each jupyter user's workspace and home with restic (their restore onto a new PC: labfleet.restore).

With ``backup_repository`` set, every host gets restic from its distribution and a systemd
timer (``backup_schedule``) that runs ``labfleet-backup``: one restic snapshot per user and
directory, taken with ``--host <inventory name>`` and tagged ``labfleet``, ``user:<name>`` and
``kind:workspace`` or ``kind:home``; then this host's snapshots beyond ``backup_keep`` are
forgotten and pruned (never another host's: a dead PC's snapshots stay until the admin
removes them). Datasets are not backed up: they have sources.

Every run leaves two small files in /var/lib/labfleet/backup: last-run.json (ok, or the
reason it failed) and last-success.json (when, and restic's summary of each snapshot). The
status reads them; it never reaches the repository.

Files on each host:

- /etc/labfleet/backup/password (0600, from backup_password_file), ssh_key (0600, from
  backup_ssh_key) and known_hosts (the server's key, learnt on first contact);
- /opt/labfleet/backup/labfleet-restic: restic with this host's repository, password file and
  SSH options (the deploy, the service and an admin all use it);
- /opt/labfleet/backup/labfleet-backup: what the service runs;
- /etc/systemd/system/labfleet-backup.service and .timer.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import files, systemd

from labfleet import apt, preflight, snapshot_files
from labfleet.busy_check import duration_text
from labfleet.facts.backup import (
    BACKUP_DIR,
    LAST_RUN,
    LAST_SUCCESS,
    RESTIC,
    SINCE,
    STATE_DIR,
    BackupSummaryState,
    ResticRepository,
    backup_bytes,
)
from labfleet.facts.system import PathState, PathStates, ServiceState, UnitState, path_is
from labfleet.planning import Read, snapshot, step, unless_current
from labfleet.settings import Settings

BACKUP_SCRIPT = f"{BACKUP_DIR}/labfleet-backup"
CONFIG_DIR = "/etc/labfleet/backup"
PASSWORD_FILE = f"{CONFIG_DIR}/password"
SSH_KEY = f"{CONFIG_DIR}/ssh_key"
KNOWN_HOSTS = f"{CONFIG_DIR}/known_hosts"
CACHE_DIR = "/var/cache/labfleet-restic"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "labfleet-backup.service"
TIMER = "labfleet-backup.timer"
# The repository a host has checked (and made, if it was missing): the check runs again only when it changes.
CHECKED = f"{STATE_DIR}/repository"
# How long a backup or a prune waits for another host's exclusive lock on the shared repository.
RETRY_LOCK = "1h"


# --- What is written on the host ------------------------------------------------------------------


def sftp_command(settings: Settings) -> str | None:
    """The ssh command restic runs for an sftp: repository (``-o sftp.command``), or None for a local one.

    A host learns the server's key on first contact (accept-new) and holds it from then on, in
    a known_hosts file of its own; with backup_ssh_key, it logs in with that key only.
    """
    repository = settings.backup_repository
    if repository is None or repository.kind != "sftp":
        return None
    args = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=20",
        "-o", "ServerAliveInterval=30",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
    ]  # fmt: skip
    if settings.backup_ssh_key:
        args += ["-i", SSH_KEY, "-o", "IdentitiesOnly=yes"]
    if repository.port:
        args += ["-p", str(repository.port)]
    if repository.user:
        args += ["-l", repository.user]
    return " ".join([*args, str(repository.server), "-s", "sftp"])


def restic_wrapper(settings: Settings) -> str:
    """labfleet-restic: restic with this host's repository. The password stays in its file."""
    assert settings.backup_repository is not None
    sftp = sftp_command(settings)
    option = f"-o {shlex.quote('sftp.command=' + sftp)} " if sftp else ""
    return (
        "#!/bin/sh\n"
        "# labfleet-restic ARGS... (written by labfleet): restic with this host's backup repository.\n"
        f"export RESTIC_REPOSITORY={shlex.quote(settings.backup_repository.text)}\n"
        f"export RESTIC_PASSWORD_FILE={PASSWORD_FILE}\n"
        f"export RESTIC_CACHE_DIR={CACHE_DIR}\n"
        f'exec restic {option}"$@"\n'
    )


def keep_options(settings: Settings) -> str:
    return " ".join(f"--keep-{kind} {count}" for kind, count in settings.backup_keep)


def backup_script(settings: Settings) -> str:
    """labfleet-backup: one snapshot per user and directory, the retention, and the summary files."""
    lines = [
        f"one {shlex.quote(user.name)} {kind} {shlex.quote(path)}"
        for user in settings.jupyter_users
        for kind, path in (("workspace", user.workspace_dir), ("home", user.home_dir))
    ]
    return f"""\
#!/bin/sh
# labfleet-backup (written by labfleet): run by {SERVICE}. One restic snapshot per jupyter user
# and directory, tagged with the user and the directory's kind, then this host's snapshots beyond
# backup_keep are forgotten and pruned. Leaves {LAST_RUN} after every run and
# {LAST_SUCCESS} after a run that backed everything up; ./run status reads them.
set -u
restic={RESTIC}
host={shlex.quote(settings.host)}
state={STATE_DIR}
mkdir -p "$state"
work=$(mktemp -d) || exit 1
trap 'rm -rf "$work"' EXIT
snapshots=
failed=
reason() {{
  grep -E '^(Fatal|ssh|subprocess ssh|error|Error)' "$work/err" | tail -n 3 | tr '\\n' ' ' |
    tr -d '\\000-\\037"\\\\' | cut -c1-400
}}
one() {{
  [ -d "$3" ] || return 0
  "$restic" backup --json --host "$host" --tag labfleet --tag "user:$1" --tag "kind:$2" \\
    --exclude-caches --retry-lock {RETRY_LOCK} "$3" >"$work/out" 2>"$work/err"
  code=$?
  # 3: some files could not be read; the snapshot of the others was made.
  if [ $code -ne 0 ] && [ $code -ne 3 ]; then
    why=$(reason)
    failed="$failed${{failed:+; }}$1 $2: ${{why:-restic exited $code}}"
    return 0
  fi
  summary=$(grep '"message_type":"summary"' "$work/out" | tail -n 1)
  path=$(printf %s "$3" | sed 's/[\\\\"]/\\\\&/g')
  snapshots="$snapshots${{snapshots:+,}}{{\\"user\\":\\"$1\\",\\"kind\\":\\"$2\\",\\"path\\":\\"$path\\",\\"summary\\":${{summary:-null}}}}"
}}
{chr(10).join(lines)}
if [ -z "$failed" ]; then
  "$restic" forget --host "$host" --tag labfleet --group-by host,tags {keep_options(settings)} \\
    --prune --retry-lock {RETRY_LOCK} >/dev/null 2>"$work/err" || failed="retention: $(reason)"
fi
now=$(date +%s)
if [ -z "$failed" ]; then
  printf '{{"time": %s, "snapshots": [%s]}}\\n' "$now" "$snapshots" > "$state/.last-success" &&
    mv "$state/.last-success" {LAST_SUCCESS}
  printf '{{"time": %s, "ok": true}}\\n' "$now" > "$state/.last-run" && mv "$state/.last-run" {LAST_RUN}
  exit 0
fi
printf '{{"time": %s, "ok": false, "error": "%s"}}\\n' "$now" "$failed" > "$state/.last-run" &&
  mv "$state/.last-run" {LAST_RUN}
echo "labfleet-backup: $failed" >&2
exit 1
"""


def service_text(settings: Settings) -> str:
    return (
        "[Unit]\n"
        f"Description=labfleet: back up the workspaces and homes to {settings.backup_repository}\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={BACKUP_SCRIPT}\n"
        # Work goes on while the backup reads: it yields the CPU and the disk.
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
    )


def timer_text(settings: Settings) -> str:
    # Spread the hosts of a lab over a while, so that they do not all wait for one lock at once.
    spread = max(1, min(settings.backup_schedule.period // 10, 1800))
    return (
        "[Unit]\n"
        f"Description=labfleet: back up the workspaces and homes ({settings.backup_schedule})\n\n"
        "[Timer]\n"
        f"OnCalendar={settings.backup_schedule}\n"
        "Persistent=true\n"
        f"RandomizedDelaySec={spread}\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def host_files(settings: Settings) -> dict[str, tuple[str, str]]:
    """The files this module writes from text: path -> (text, mode)."""
    return {
        RESTIC: (restic_wrapper(settings), "755"),
        BACKUP_SCRIPT: (backup_script(settings), "755"),
        f"{UNIT_DIR}/{SERVICE}": (service_text(settings), "644"),
        f"{UNIT_DIR}/{TIMER}": (timer_text(settings), "644"),
    }


def controller_files(settings: Settings) -> dict[str, str]:
    """The files copied from the controller: path on the host -> file on the controller."""
    out = {}
    if settings.backup_password_file:
        out[PASSWORD_FILE] = settings.backup_password_file
    if settings.backup_ssh_key and sftp_command(settings):
        out[SSH_KEY] = settings.backup_ssh_key
    return out


def packages(settings: Settings) -> list[str]:
    return ["restic", "openssh-client"] if sftp_command(settings) else ["restic"]


def reads(settings: Settings) -> dict[str, Read]:
    """What the backups are decided from: their files, the timer, the packages."""
    if settings.backup_repository is None:
        return {"timer": Read(ServiceState, {"service": TIMER})}
    digests = [*host_files(settings), *controller_files(settings), CHECKED]
    paths = [BACKUP_DIR, CONFIG_DIR, STATE_DIR, SINCE, *digests]
    return {
        "packages": Read(DebPackages),
        "paths": Read(PathStates, {"paths": tuple(paths), "digests": tuple(digests)}),
        "timer": Read(ServiceState, {"service": TIMER}),
    }


@dataclass(frozen=True)
class BackupState:
    timer: UnitState
    packages: dict | None = None
    paths: dict[str, PathState] | None = None


# --- Operations ---------------------------------------------------------------------------------


def key_hint(settings: Settings) -> str:
    repository = settings.backup_repository
    if repository is None or repository.kind != "sftp":
        return "check that the repository's directory is mounted and writable by root"
    account = f"{repository.user or 'root'}@{repository.server}"
    key = (
        f"the public key of backup_ssh_key ({settings.backup_ssh_key}.pub)"
        if settings.backup_ssh_key
        else ("root's public key of this host")
    )
    return f"check that {repository.server} is reachable and that {account} accepts {key} in its authorized_keys"


@operation(is_idempotent=True)
def check_repository(repository: str, marker: str, hint: str):
    """Make the restic repository if there is none (``restic init``), and note that this host checked it.

    + repository: the repository as restic is given it (what the marker holds)
    + marker: the file that holds the repository once checked
    + hint: what to check when the repository cannot be opened

    **Example:**

    .. code:: python

        check_repository(name="Check the backup repository", repository="sftp:backup@nas.lab:/srv/restic",
                         marker="/var/lib/labfleet/backup/repository", hint="check that nas.lab is reachable")
    """
    found = host.get_fact(ResticRepository)
    write = snapshot_files.note_command(marker, f"{repository}\n")
    if found["state"] == "exists":
        yield write
    elif found["state"] in ("missing", "unavailable"):
        # unavailable: labfleet-restic arrives in this run (a preview reads the host before it).
        yield f"{shlex.quote(RESTIC)} init >/dev/null && {write}"
    else:
        yield preflight.failing_command(
            f"host {host.name}: cannot open the backup repository {repository}: {found['error']}; {hint}, "
            "then run the deploy again"
        )


# --- Steps --------------------------------------------------------------------------------------


@step("Set up the backups of the workspaces and homes")
def set_up_backups(settings: Settings):
    state = snapshot(BackupState, reads(settings))
    if settings.backup_repository is None:
        return
    assert state.paths is not None and state.packages is not None
    wanted = packages(settings)
    unless_current(
        apt.ensure_packages,
        current=not apt.missing_packages(wanted, state.packages),
        name="Install restic",
        packages=wanted,
    )
    paths = state.paths
    snapshot_files.directory(paths, f"Create {BACKUP_DIR}", BACKUP_DIR, "root", "root", "755")
    snapshot_files.directory(paths, f"Create {CONFIG_DIR}", CONFIG_DIR, "root", "root", "700")
    snapshot_files.directory(paths, f"Create {STATE_DIR}", STATE_DIR, "root", "root", "755")
    for dest, local in controller_files(settings).items():
        snapshot_files.controller_file(paths, f"Copy {dest}", local, dest, "root", "root", "600")
    units = {}
    for path, (text, mode) in host_files(settings).items():
        if path.startswith(UNIT_DIR):
            units[path] = text
        else:
            snapshot_files.text_file(paths, f"Write {path}", text, path, "root", "root", mode)
    snapshot_files.systemd_units(paths, units, "Reload systemd for the backup timer")
    unless_current(
        check_repository,
        current=path_is(paths, CHECKED, "file", sha1=snapshot_files.text_sha1(f"{settings.backup_repository.text}\n")),
        name="Check the backup repository",
        repository=settings.backup_repository.text,
        marker=CHECKED,
        hint=key_hint(settings),
    )
    unless_current(
        files.file,
        current=SINCE in paths,
        name="Note when the backups were set up",
        path=SINCE,
    )


@step("Schedule the backups")
def schedule_backups(settings: Settings):
    """Start the timer once a restore_from is done, so that no backup of a half-restored PC
    takes the place of the snapshots it is restored from."""
    timer = snapshot(BackupState, reads(settings)).timer
    if settings.backup_repository is not None:
        unless_current(
            systemd.service,
            current=timer["enabled"] == "enabled" and timer["active"] == "active",
            name="Start the backup timer",
            service=TIMER,
            running=True,
            enabled=True,
        )
    elif timer["enabled"] == "enabled" or timer["active"] == "active":
        # Backups switched off: the timer stops; the files, the repository and its snapshots stay.
        systemd.service(
            name="Stop the backup timer (backup_repository is unset)",
            service=TIMER,
            running=False,
            enabled=False,
        )


# --- What the status shows ----------------------------------------------------------------------


def status_row(settings: Settings, summary: BackupSummaryState) -> dict | None:
    """The status's view of this host's backups, from the summary files (None: backups are off)."""
    if settings.backup_repository is None:
        return None
    now, success, run = summary["now"], summary["last_success"], summary["last_run"]
    last = success.get("time") if success else None
    failed = run is not None and run.get("ok") is False
    return {
        "repository": settings.backup_repository.text,
        "schedule": settings.backup_schedule.text,
        "period": settings.backup_schedule.period,
        "last": last if isinstance(last, int) else None,
        "age": now - last if isinstance(now, int) and isinstance(last, int) else None,
        "bytes": backup_bytes(success),
        "since": summary["since"],
        "now": now,
        "failed": ((run or {}).get("error") or "failed") if failed else None,
        "failed_at": (run or {}).get("time") if failed else None,
    }


def status_reasons(row: dict | None) -> list[str]:
    """Why a host's backups are drift: the last run failed, or the last snapshot is older than twice the schedule."""
    if row is None:
        return []
    reasons = []
    limit = 2 * row["period"]
    if row["failed"] is not None:
        when = row["now"] - row["failed_at"] if isinstance(row["now"], int) and isinstance(row["failed_at"], int) else 0
        reasons.append(f"the last backup failed ({duration_text(when)} ago): {row['failed']}")
    if row["age"] is not None:
        if row["age"] > limit:
            reasons.append(
                f"the last backup is {duration_text(row['age'])} old, more than twice backup_schedule "
                f"{row['schedule']!r}"
            )
    elif row["since"] is None or row["now"] is None:
        reasons.append("backups are not set up on this host yet; run the deploy")
    elif row["now"] - row["since"] > limit:
        reasons.append(
            f"no backup since they were set up {duration_text(row['now'] - row['since'])} ago "
            f"(backup_schedule {row['schedule']!r})"
        )
    return reasons


def status_cell(row: dict | None) -> str:
    """The status table's backup cell: the last snapshot's age and size."""
    if row is None:
        return "-"
    if row["age"] is None:
        cell = "none yet"
    else:
        size = "?" if row["bytes"] is None else f"{row['bytes'] / 2**30:.1f}G"
        cell = f"{duration_text(row['age'])} ago {size}"
    return cell + (" (failed)" if row["failed"] is not None else "")
