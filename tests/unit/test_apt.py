"""labfleet/apt.py: the commands every apt operation runs, and what counts as missing."""

import hashlib
import subprocess
from types import SimpleNamespace

from pyinfra.facts.files import FileContents

from labfleet import apt, planning


def test_apt_get_waits_for_locks_and_never_prompts():
    command = apt.apt_get("install curl", lock_timeout=42)
    assert "DEBIAN_FRONTEND=noninteractive" in command
    assert "-o DPkg::Lock::Timeout=42" in command
    assert "--force-confold" in command
    assert "Could not get lock" in command
    assert "after 42 s" in command


def _fake(directory, name: str, body: str) -> None:
    """A stand-in command on PATH: these tests exercise apt_get's shell, not apt itself."""
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run_with_fakes(directory, arguments: str, lock_timeout: int):
    return subprocess.run(
        ["sh", "-c", apt.apt_get(arguments, lock_timeout=lock_timeout)],
        capture_output=True,
        text=True,
        env={"PATH": f"{directory}:/usr/bin:/bin"},
        timeout=30,
    )


def test_apt_get_waits_while_the_lock_is_held_and_then_runs(tmp_path):
    # A fake apt-get that finds the lists lock held once, then gets it.
    _fake(
        tmp_path,
        "apt-get",
        f"[ -f {tmp_path}/released ] && {{ echo updated; exit 0; }}\n"
        f"touch {tmp_path}/released\n"
        "echo 'E: Could not get lock /var/lib/apt/lists/lock. It is held by process 7'\nexit 100",
    )
    result = _run_with_fakes(tmp_path, "update", lock_timeout=60)
    assert result.returncode == 0, result.stderr
    assert "waiting for the apt/dpkg lock: E: Could not get lock" in result.stderr
    assert "updated" in result.stdout


def test_apt_get_gives_up_on_a_lock_held_past_the_deadline(tmp_path):
    _fake(
        tmp_path, "apt-get", "echo 'E: Could not get lock /var/lib/apt/lists/lock. It is held by process 7'\nexit 100"
    )
    result = _run_with_fakes(tmp_path, "update", lock_timeout=0)
    assert result.returncode == 1
    assert "still holds the apt/dpkg lock after 0 s" in result.stderr
    assert "let it finish, or stop it, then run the deploy again" in result.stderr


def test_apt_get_passes_other_failures_through_at_once(tmp_path):
    _fake(tmp_path, "apt-get", "echo 'E: Unable to locate package nope'\nexit 100")
    result = _run_with_fakes(tmp_path, "install nope", lock_timeout=60)
    assert result.returncode == 100
    assert "Unable to locate package nope" in result.stderr
    assert "waiting" not in result.stderr


def test_update_turns_warnings_into_errors():
    command = apt.apt_update()
    assert "APT::Update::Error-Mode=any" in command
    assert "Signed-By" in command


def test_missing_packages_honours_pinned_versions():
    installed = {"docker-ce": ["5:27.3.1-1"], "curl": ["8.0"]}
    assert apt.missing_packages(["curl", "docker-ce=5:27.3.1-1"], installed) == []
    assert apt.missing_packages(["docker-ce=5:28.0.0-1", "wget"], installed) == ["docker-ce=5:28.0.0-1", "wget"]


def test_deb822_source_and_pin():
    text = apt.deb822_source("http://m/debian", "trixie", "stable", "/etc/apt/keyrings/x.asc", architectures="amd64")
    assert text == (
        "Types: deb\nURIs: http://m/debian\nSuites: trixie\nComponents: stable\n"
        "Architectures: amd64\nSigned-By: /etc/apt/keyrings/x.asc\n"
    )
    assert apt.pin_preferences(["docker-ce", "docker-ce-cli"], "5:27.3.1-1") == (
        "Package: docker-ce docker-ce-cli\nPin: version 5:27.3.1-1\nPin-Priority: 1001\n"
    )


def test_apt_get_finishes_an_interrupted_dpkg_run_and_tries_again(tmp_path):
    # apt refuses until `dpkg --configure -a` has run, then succeeds.
    _fake(
        tmp_path,
        "apt-get",
        f"[ -f {tmp_path}/configured ] && {{ echo installed; exit 0; }}\n"
        "echo \"E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem.\"\n"
        "exit 100",
    )
    _fake(tmp_path, "dpkg", f'echo "$@" > {tmp_path}/configured')
    result = _run_with_fakes(tmp_path, "install curl", lock_timeout=60)
    assert result.returncode == 0, result.stderr
    assert "installed" in result.stdout
    assert "finishing it with dpkg --configure -a" in result.stderr
    assert (tmp_path / "configured").read_text().split()[-2:] == ["--configure", "-a"]


def test_apt_get_gives_up_when_dpkg_cannot_be_finished(tmp_path):
    _fake(tmp_path, "apt-get", "echo 'E: dpkg was interrupted, you must manually run it'\nexit 100")
    _fake(tmp_path, "dpkg", "echo 'dpkg: error processing package x' >&2\nexit 1")
    result = _run_with_fakes(tmp_path, "install curl", lock_timeout=60)
    assert result.returncode == 100
    assert result.stderr.count("finishing it with dpkg --configure -a") == 2
    assert "dpkg was interrupted" in result.stderr


# --- A signed third-party repository -----------------------------------------------------------

REPO = apt.AptRepository(
    name="vendor",
    owner="Vendor",
    product="the vendor's tools",
    markers=("apt.vendor.example/",),
    key_files=("/usr/share/keyrings/vendor.gpg",),
    pin_packages=("vendor-tool",),
)
SOURCE = apt.AptSource(
    uris="https://apt.vendor.example/debian",
    suites="trixie",
    components="main",
    architectures="amd64",
    key_url="https://apt.vendor.example/key.asc",
)


def entries(*files, present=(), sha256=None):
    return {
        "files": [{"path": path, "entries": n, "matching": m} for path, n, m in files],
        "present": list(present),
        "sha256": sha256 or {},
    }


def test_a_repository_keeps_its_own_files_and_names_the_rest():
    assert (REPO.sources_file, REPO.keyring, REPO.pin_file) == (
        "/etc/apt/sources.list.d/vendor.sources",
        "/etc/apt/keyrings/vendor.asc",
        "/etc/apt/preferences.d/labfleet-vendor",
    )
    found = entries(
        (REPO.sources_file, 1, 1),
        ("/etc/apt/sources.list.d/vendor.list", 1, 1),
        ("/etc/apt/sources.list.d/lab.sources", 4, 1),
        present=[REPO.keyring, REPO.pin_file, "/usr/share/keyrings/vendor.gpg"],
    )
    assert apt.stale_files(REPO, SOURCE, found) == [
        "/etc/apt/sources.list.d/vendor.list",
        REPO.pin_file,  # no version pinned
        "/usr/share/keyrings/vendor.gpg",
    ]
    assert apt.mixed_files(REPO, SOURCE, found) == ["/etc/apt/sources.list.d/lab.sources"]
    pinned = apt.AptSource(**{**SOURCE.__dict__, "pin_version": "1.2-1"})
    assert REPO.pin_file not in apt.stale_files(REPO, pinned, found)
    # Not wanted any more: every file of the repository goes, its sources file included.
    assert apt.stale_files(REPO, None, found)[:2] == [REPO.sources_file, "/etc/apt/sources.list.d/vendor.list"]
    read = apt.repository_read(REPO)
    assert read.kwargs["markers"] == REPO.markers and REPO.sources_file in read.kwargs["paths"]


class Planned:
    """An operation's result as the repository step uses it."""

    def __init__(self, changed: bool):
        self.changed = changed

    def did_change(self) -> bool:
        return self.changed


def test_add_repository_plans_only_what_the_snapshot_shows_missing(monkeypatch):
    from test_planning import PlanningHost

    fake = PlanningHost({})
    monkeypatch.setattr(planning, "host", fake)
    planned: list[tuple[str, dict]] = []

    def op(kind: str, changes: bool):
        def plan(**kwargs):
            fake.meta.ops += 1
            planned.append((kind, kwargs))
            return Planned(changes)

        return plan

    monkeypatch.setattr(apt, "files", SimpleNamespace(file=op("remove", True), put=op("put", False)))
    monkeypatch.setattr(apt, "install_keyring", op("key", False))
    monkeypatch.setattr(apt, "ensure_packages", op("install", False))
    text = apt.sources_text(REPO, SOURCE)
    found = entries(
        (REPO.sources_file, 1, 1),
        ("/etc/apt/sources.list.d/vendor.list", 1, 1),
        sha256={REPO.sources_file: hashlib.sha256(text.encode()).hexdigest()},
    )
    changed = apt.add_repository(REPO, SOURCE, found, installed={"curl": ["8"], "ca-certificates": ["1"]})
    # The stale file goes; everything after it that the snapshot shows current is planned only to
    # look again when it runs, in case this run changed the host; the key is always checked.
    assert [kind for kind, _ in planned] == ["remove", "install", "key", "put"]
    assert planned[0][1]["path"] == "/etc/apt/sources.list.d/vendor.list"
    assert "_if" in planned[1][1] and "_if" in planned[3][1]
    assert planned[2][1] == {"name": "Install Vendor's repository key", "url": SOURCE.key_url, "path": REPO.keyring}
    assert changed() is True, "the stale file's removal counts as a change of the repository"

    planned.clear()
    fake = PlanningHost({})
    monkeypatch.setattr(planning, "host", fake)
    found = {**found, "files": found["files"][:1]}
    changed = apt.add_repository(REPO, SOURCE, found, installed={"curl": ["8"], "ca-certificates": ["1"]})
    # Nothing stale and nothing missing: curl and ca-certificates are not planned at all.
    assert [kind for kind, _ in planned] == ["key", "put"]
    assert changed() is False


def test_a_repository_key_that_cannot_be_downloaded_leaves_the_keyring_alone(tmp_path, fake_host_in):
    fake_host_in(apt, {apt.KeyringDigests: {"remote": None, "local": "abc"}})
    (command,) = apt.install_keyring._inner(url="http://127.0.0.1:9/gpg", path=str(tmp_path / "key.asc"))
    _fake(tmp_path, "curl", "exit 22")
    _fake(tmp_path, "wget", "exit 4")
    (tmp_path / "key.asc").write_text("old key\n")
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "labfleet: could not download the repository key http://127.0.0.1:9/gpg; check the URL "
        "(docker_apt_mirror) and that this host reaches it"
    )
    assert (tmp_path / "key.asc").read_text() == "old key\n"


# --- Components of the distribution's own sources (Debian's non-free, for its NVIDIA driver) ------

COMPONENTS = ("contrib", "non-free", "non-free-firmware")
DEBIAN_SOURCES = """\
Types: deb
URIs: http://archive.example/debian
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Enabled: no
Types: deb-src
URIs: http://archive.example/debian
Suites: trixie
Components: main
"""


def test_non_free_is_added_to_the_distributions_deb822_entries_only():
    suites = ("trixie", "trixie-updates", "trixie-security")
    text = apt.add_components(DEBIAN_SOURCES, "/etc/apt/sources.list.d/debian.sources", suites, COMPONENTS)
    assert text.splitlines()[3] == "Components: main non-free-firmware contrib non-free"
    assert text.splitlines()[9] == "Components: main contrib non-free non-free-firmware"
    assert text.split("\n\n")[2] == DEBIAN_SOURCES.split("\n\n")[2]  # a disabled stanza is left alone
    assert apt.add_components(text, "/etc/apt/sources.list.d/debian.sources", suites, COMPONENTS) == text


def test_non_free_is_added_to_one_line_entries_with_main():
    text = (
        "# installer\n"
        "deb http://archive.example/debian bookworm main non-free-firmware\n"
        "deb [arch=amd64] http://security.example/debian-security bookworm-security main # security\n"
        "deb http://vendor.example/apt stable main\n"
        "deb http://archive.example/debian bookworm-backports main\n"
    )
    suites = ("bookworm", "bookworm-updates", "bookworm-security")
    lines = apt.add_components(text, "/etc/apt/sources.list", suites, COMPONENTS).splitlines()
    assert lines[1] == "deb http://archive.example/debian bookworm main non-free-firmware contrib non-free"
    assert lines[2] == (
        "deb [arch=amd64] http://security.example/debian-security bookworm-security main "
        "contrib non-free non-free-firmware # security"
    )
    assert lines[0] == "# installer" and lines[3:] == text.splitlines()[3:]


def test_enable_apt_components_uploads_only_a_difference(fake_host_in):
    fake = fake_host_in(apt, {FileContents: DEBIAN_SOURCES.splitlines()})
    path = "/etc/apt/sources.list.d/debian.sources"
    commands = list(apt.enable_apt_components._inner(path, ["trixie"], COMPONENTS))
    assert len(commands) == 2 and commands[1] == f"chmod 644 {path}"
    fake.facts[FileContents] = None
    assert list(apt.enable_apt_components._inner(path, ["trixie"], COMPONENTS)) == []
    assert fake.noops == [f"{path} does not exist"]
