"""Facts labfleet reads from hosts, each with its own small parser."""

from __future__ import annotations

import json
import re
import shlex

from pyinfra import host
from pyinfra.api import FactBase

# PCI display classes: VGA (0x0300xx) and 3D controller (0x0302xx, the data-centre cards).
GPU_CLASSES = ("0x0300", "0x0302")


class FactBatch(FactBase):
    """Several facts in one command, so one round trip per host instead of one per fact.

    + parts: ``((FactClass, {kwargs}), ...)``

    Returns a list with each part's value, parsed by that fact's own ``process`` (its
    ``default()`` when the part printed nothing). pyinfra 3 keeps no fact cache, so every
    fact a step reads costs a round trip; a step that reads its state in one batch keeps
    the no-change re-run close to the cost of connecting.

    **Example:**

    .. code:: python

        packages, arch = host.get_fact(FactBatch, parts=((DebPackages, {}), (DebArch, {})))
    """

    MARK = "--labfleet-fact-batch--"

    def command(self, parts) -> str:
        # The parts run in parallel, each into its own file after its marker, and one `cat`
        # prints them in order: every program started costs the host a fork and an exec.
        self.parts = [(fact_class(), dict(kwargs)) for fact_class, kwargs in parts]
        started = " ".join(
            f'( echo {self.MARK}; {fact.command(**kwargs)} ) >"$d/{index}" 2>/dev/null &'
            for index, (fact, kwargs) in enumerate(self.parts)
        )
        files = " ".join(f'"$d/{index}"' for index in range(len(self.parts)))
        return f'd=$(mktemp -d) || exit 1; {started} wait; cat {files}; rm -rf "$d"'

    def process(self, output):
        sections: list[list[str]] = []
        for line in output:
            if line.rstrip().endswith(self.MARK):
                # A part whose output has no final newline shares its last line with the mark.
                rest = line.rstrip()[: -len(self.MARK)]
                if rest and sections:
                    sections[-1].append(rest)
                sections.append([])
            elif sections:
                sections[-1].append(line)
        values = []
        for index, (fact, _) in enumerate(self.parts):
            lines = sections[index] if index < len(sections) else []
            values.append(fact.process(lines) if lines else fact.default())
        return values


class DaemonJson(FactBase):
    """Docker's daemon.json, parsed.

    Returns ``{"present": bool, "config": dict | None, "error": str | None}``; ``error``
    says why a file that exists is not a JSON object (``config`` is then None).
    """

    def command(self, path: str = "/etc/docker/daemon.json") -> str:
        quoted = shlex.quote(path)
        return f"if [ -f {quoted} ]; then echo present; cat {quoted}; else echo absent; fi"

    def process(self, output):
        lines = list(output)
        if not lines or lines[0] != "present":
            return {"present": False, "config": None, "error": None}
        return {"present": True, **parse_daemon_json("\n".join(lines[1:]))}


def parse_daemon_json(text: str) -> dict:
    """``{"config": dict, "error": None}`` or ``{"config": None, "error": why}``.

    An empty file counts as ``{}``: dockerd itself starts with one.
    """
    if not text.strip():
        return {"config": {}, "error": None}
    try:
        config = json.loads(text)
    except ValueError as exc:
        return {"config": None, "error": f"invalid JSON: {exc}"}
    if not isinstance(config, dict):
        return {"config": None, "error": f"the top level is a JSON {type(config).__name__}, not an object"}
    return {"config": config, "error": None}


class AptSourceEntries(FactBase):
    """apt source files that hold entries for any of the given repository URLs, and which of some paths exist.

    + markers: URL fragments that identify the repository
    + paths: other files to look for (the repository's keyrings, pin files)

    Returns ``{"files": [{"path", "entries", "matching"}], "present": [path, ...], "sha256": {path: hex}}``:
    ``entries`` counts all entries of the file (``deb`` lines, or ``URIs:`` fields of
    deb822 stanzas) and ``matching`` those that name one of the markers, so a caller can
    tell a file that belongs to the repository from one it merely shares.
    """

    @staticmethod
    def default():
        return {"files": [], "present": [], "sha256": {}}

    def command(self, markers: tuple[str, ...], paths: tuple[str, ...] = ()) -> str:
        fixed = " ".join(f"-e {shlex.quote(marker)}" for marker in markers)
        others = " ".join(shlex.quote(path) for path in paths)
        return (
            "for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do "
            '[ -f "$f" ] || continue; '
            "case $f in *.sources) e='^[[:space:]]*URIs:';; *) e='^[[:space:]]*deb(-src)?[[:space:]]';; esac; "
            'n=$(grep -Ec "$e" "$f"); '
            f'm=$(grep -E "$e" "$f" | grep -Fc {fixed}); '
            '[ "$m" -gt 0 ] && echo "file $n $m $f"; '
            "done; "
            + (
                f'for p in {others}; do [ -f "$p" ] && echo "present $(sha256sum < "$p" | cut -d" " -f1) $p"; done; '
                if others
                else ""
            )
            + "true"
        )

    def process(self, output):
        found = self.default()
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "file":
                entries, matching, path = rest.split(" ", 2)
                found["files"].append({"path": path, "entries": int(entries), "matching": int(matching)})
            elif kind == "present":
                digest, _, path = rest.partition(" ")
                found["present"].append(path)
                found["sha256"][path] = digest
        return found


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class KeyringDigests(FactBase):
    """sha256 of a repository key as served at url, and of the copy at path.

    Returns ``{"remote": hex | None, "local": hex | None}``; remote is None when the
    host could not download the key (no curl/wget yet, or the URL does not answer).
    """

    @staticmethod
    def default():
        return {"remote": None, "local": None}

    def command(self, url: str, path: str) -> str:
        url, path = shlex.quote(url), shlex.quote(path)
        return (
            f"r=$({{ curl -fsSL --max-time 30 {url} 2>/dev/null || wget -q -T 30 -O- {url} 2>/dev/null; }} "
            '| sha256sum | cut -d" " -f1); '
            'echo "remote $r"; '
            f'[ -f {path} ] && echo "local $(sha256sum < {path} | cut -d" " -f1)"; true'
        )

    def process(self, output):
        digests = {"remote": None, "local": None}
        for line in output:
            kind, _, value = line.partition(" ")
            if kind in digests and value and value != EMPTY_SHA256:
                digests[kind] = value
        return digests


class AppArmorEnabled(FactBase):
    """Whether the kernel enforces AppArmor (dockerd then needs apparmor_parser)."""

    @staticmethod
    def default():
        return False

    def command(self) -> str:
        return "cat /sys/module/apparmor/parameters/enabled 2>/dev/null; true"

    def process(self, output):
        return bool(output) and output[0].strip() == "Y"


DOCKER_SOCKET = "/var/run/docker.sock"
HTTP_MARK = "--labfleet-http"


def _socket_curl() -> str:
    """curl on the engine's socket (read when a command is made, so tests can point it elsewhere)."""
    return f"curl --silent --globoff --max-time 30 --unix-socket {shlex.quote(DOCKER_SOCKET)}"


def docker_api(*paths: str) -> str:
    """One curl that asks the engine's API for each path in turn, each answer followed by a
    ``--labfleet-http <status>`` line; nothing when curl or the engine is missing.

    The docker CLI is a Go program that costs the host tens of milliseconds of CPU to start,
    and these facts are read on every run; labfleet installs curl with the engine.
    """
    urls = " ".join(shlex.quote(f"http://docker{path}") for path in paths)
    return (
        f"command -v curl >/dev/null || exit 0; {_socket_curl()} --write-out '\\n{HTTP_MARK} %{{http_code}}\\n' {urls}"
    )


def api_answers(output) -> list[tuple[int, str]]:
    """(status, body) for each answer docker_api printed; status 0 where the engine did not answer."""
    answers, body = [], []
    for line in output:
        if line.startswith(HTTP_MARK):
            code = line[len(HTTP_MARK) :].strip()
            answers.append((int(code) if code.isdigit() else 0, "\n".join(body)))
            body = []
        else:
            body.append(line)
    return answers


def api_json(status: int, body: str) -> dict | None:
    """The JSON object of a 200 answer, None for anything else."""
    if status != 200:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class DockerEngineStatus(FactBase):
    """The engine and Compose: ``{"server": "26.1.5" | None, "compose": "2.26.1" | None}``.

    ``server`` is the engine's version when it answers on its socket (the ``Server`` header
    of ``/_ping``, which costs the engine nothing, unlike ``/version``); ``compose`` is the
    Compose v2 plugin's version. A plugin installed from a package has that package's
    version (the plugin prints the same), read from dpkg; only a plugin that no package owns
    is run (``version --short``). Compose v1 has no plugin.
    """

    PLUGIN_DIRS = (
        "/usr/local/lib/docker/cli-plugins",
        "/usr/local/libexec/docker/cli-plugins",
        "/usr/lib/docker/cli-plugins",
        "/usr/libexec/docker/cli-plugins",
    )

    @staticmethod
    def default():
        return {"server": None, "compose": None}

    def command(self) -> str:
        plugins = " ".join(f"{directory}/docker-compose" for directory in self.PLUGIN_DIRS)
        return (
            "command -v docker >/dev/null || exit 0; "
            f"command -v curl >/dev/null && {_socket_curl()} --output /dev/null --dump-header - http://docker/_ping; "
            f'c=; for p in {plugins}; do [ -x "$p" ] && {{ c=$p; break; }}; done; '
            'if [ -z "$c" ]; then echo "compose $(docker compose version --short 2>/dev/null)"; exit 0; fi; '
            'set -- $(grep -lx -- "$c" /var/lib/dpkg/info/docker*.list 2>/dev/null); '
            'if [ -n "$1" ]; then p=${1##*/}; echo "package $(dpkg-query -W -f \'${Version}\' "${p%.list}")"; '
            'else echo "compose $("$c" version --short 2>/dev/null)"; fi'
        )

    def process(self, output):
        status = self.default()
        for line in output:
            kind, _, value = line.strip().partition(" ")
            if kind.lower() == "server:" and value.startswith("Docker/"):
                status["server"] = value.removeprefix("Docker/").split()[0]
            elif kind == "compose" and value.strip():
                status["compose"] = value.strip().lstrip("v")
            elif kind == "package":
                # Epoch and Debian revision off: 2.26.1-4 -> 2.26.1, 2.27.0+ds1-0ubuntu1 -> 2.27.0
                upstream = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", value.strip())
                status["compose"] = upstream.group(1) if upstream else None
        return status


class GroupMembers(FactBase):
    """A group and some accounts: ``{"exists": bool, "members": [...], "accounts": [...]}``.

    + group: the group name
    + users: the accounts to look up; ``accounts`` lists those that exist

    ``members`` are the group's supplementary members (``getent group``). Cheaper than
    the Users fact, which runs several commands for every account on the host.
    """

    @staticmethod
    def default():
        return {"exists": False, "members": [], "accounts": []}

    def command(self, group: str, users: tuple[str, ...] = ()) -> str:
        names = " ".join(shlex.quote(user) for user in users)
        lookup = f'for u in {names}; do getent passwd "$u" >/dev/null && echo "account $u"; done; ' if names else ""
        return f'g=$(getent group {shlex.quote(group)}) && echo "group $g"; {lookup}true'

    def process(self, output):
        found = self.default()
        for line in output:
            kind, _, value = line.partition(" ")
            if kind == "group":
                found["exists"] = True
                found["members"] = [name for name in value.split(":")[-1].split(",") if name]
            elif kind == "account":
                found["accounts"].append(value)
        return found


class ServiceState(FactBase):
    """A systemd unit's state: ``{"systemd": bool, "active": "active" | ..., "enabled": "enabled" | ...}``.

    One command for both states, and no error on a host without systemd (``systemd`` is
    then False), so planning works anywhere.
    """

    @staticmethod
    def default():
        return {"systemd": False, "active": None, "enabled": None}

    def command(self, service: str) -> str:
        unit = shlex.quote(service)
        # One systemctl for both: UnitFileState is what `systemctl is-enabled` prints.
        return (
            "[ -d /run/systemd/system ] || exit 0; echo systemd; "
            f"systemctl show --property=ActiveState,UnitFileState {unit} 2>/dev/null"
        )

    def process(self, output):
        state = self.default()
        keys = {"ActiveState": "active", "UnitFileState": "enabled"}
        for line in output:
            key, _, value = line.strip().partition("=")
            if key == "systemd":
                state["systemd"] = True
            elif key in keys:
                state[keys[key]] = value or None
        return state


SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


class GpuHost(FactBase):
    """Everything the NVIDIA step decides from, in one round trip.

    Returns ``{"gpus": [slot, ...], "driver": "570.86.15" | None, "nouveau": bool,
    "secure_boot": True | False | None}``. GPUs come from sysfs (vendor 10de, display or
    3D class) or the driver's /proc entries, so neither lspci nor nvidia-smi is needed.
    """

    @staticmethod
    def default():
        return {"gpus": [], "driver": None, "nouveau": False, "secure_boot": None}

    def command(self) -> str:
        return (
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue; '
            'echo "pci ${d##*/} $(cat "$d/class" 2>/dev/null)"; done; '
            "ls /proc/driver/nvidia/gpus 2>/dev/null | sed 's/^/driver-gpu /'; "
            "sed -n 's/^NVRM version:/nvrm/p' /proc/driver/nvidia/version 2>/dev/null; "
            "grep -q '^nouveau ' /proc/modules 2>/dev/null && echo nouveau; "
            f"[ -r {SECURE_BOOT_VAR} ] && echo \"secureboot $(od -An -tu1 {SECURE_BOOT_VAR} | awk '{{print $NF}}')\"; "
            "true"
        )

    def process(self, output):
        return parse_gpu_host(output)


def parse_gpu_host(lines) -> dict:
    state = GpuHost.default()
    gpus: set[str] = set()
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        pci_gpu = parts[0] == "pci" and len(parts) >= 3 and parts[2].startswith(GPU_CLASSES)
        if pci_gpu or (parts[0] == "driver-gpu" and len(parts) == 2):
            gpus.add(parts[1])
        elif parts[0] == "nvrm":
            versions = [word for word in parts if word[:1].isdigit() and "." in word]
            state["driver"] = versions[0] if versions else None
        elif parts[0] == "nouveau":
            state["nouveau"] = True
        elif parts[0] == "secureboot" and len(parts) == 2:
            state["secure_boot"] = parts[1] == "1"
    state["gpus"] = sorted(gpus)
    return state


# --- Datasets ---------------------------------------------------------------------------


class DefaultAcl(FactBase):
    """The default ACL of a directory, as getfacl prints it without header or comments.

    Returns a tuple of entries such as ``("user::rwx", "group::r-x", "other::r-x")`` (empty when
    the directory has none), or None when the directory does not exist.
    """

    requires_command = "getfacl"

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f"if [ -d {quoted} ]; then echo present; getfacl --absolute-names --omit-header --default {quoted}; fi"

    def process(self, output):
        lines = [line.strip() for line in output if line.strip()]
        if not lines or lines[0] != "present":
            return None
        return tuple(line.removeprefix("default:") for line in lines[1:] if not line.startswith("#"))


class PublicKeyFile(FactBase):
    """The one-line OpenSSH public key in a file, or None when there is no such file."""

    def command(self, path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output):
        keys = [line.strip() for line in output if line.strip() and not line.startswith("#")]
        return keys[0] if keys else None


class SshHostKey(FactBase):
    """This host's SSH host public key ("type base64"), ed25519 when it has one, else None."""

    def command(self) -> str:
        return (
            "for t in ed25519 ecdsa rsa; do f=/etc/ssh/ssh_host_${t}_key.pub; "
            '[ -r "$f" ] && { cat "$f"; break; }; done; true'
        )

    def process(self, output):
        for line in output:
            parts = line.split()
            if len(parts) >= 2:
                return f"{parts[0]} {parts[1]}"
        return None


class RsyncDryRun(FactBase):
    """What an rsync would transfer: runs the given rsync command line with --dry-run.

    + command: an rsync command line that has --itemize-changes, without --dry-run

    Returns ``{"rc": int, "changes": [itemized lines], "errors": [other lines]}``. The command
    never fails the fact: a peer that cannot be reached is the caller's to report.
    """

    def command(self, command: str) -> str:
        return f'{command} --dry-run 2>&1; echo "labfleet-rc=$?"'

    def process(self, output):
        return parse_rsync_itemized(list(output))


def parse_rsync_itemized(lines) -> dict:
    """Split rsync --itemize-changes output (with a final ``labfleet-rc=N``) into changes and errors."""
    rc, changes, errors = 0, [], []
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
        elif _ITEMIZED.match(line):
            changes.append(line)
        elif line.strip():
            errors.append(line)
    return {"rc": rc, "changes": changes, "errors": errors}


# rsync's itemized lines: "YXcstpoguax path" (Y is <, >, c, h, . or *), e.g. ">f+++++++++ a/b",
# "cd+++++++++ a/", ".f...p..... x", "*deleting   old".
_ITEMIZED = re.compile(r"^([<>ch.][fdLDS][.+?cstpoguaxn ]{9,} |\*deleting +)\S")


class ManifestState(FactBase):
    """The sha256 of a dataset's manifest and the stamp of its last successful verification.

    Returns ``{"manifest": sha256 | None, "stamp": str | None}``.
    """

    def command(self, manifest: str, stamp: str) -> str:
        return (
            f"echo manifest $(sha256sum < {shlex.quote(manifest)} 2>/dev/null | cut -d' ' -f1); "
            f"echo stamp $(cat {shlex.quote(stamp)} 2>/dev/null)"
        )

    def process(self, output):
        state = {"manifest": None, "stamp": None}
        for line in output:
            key, _, value = line.strip().partition(" ")
            if key in state and value.strip():
                state[key] = value.strip()
        return state


class ImageId(FactBase):
    """The id of the image a reference names on this host, or None."""

    requires_command = "docker"

    def command(self, ref: str) -> str:
        return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || true"

    def process(self, output):
        return output[0].strip() if output and output[0].startswith("sha256:") else None


class LayerChains(FactBase):
    """The chain ids of every layer the host's engine has, or None on the containerd image store.

    Only the classic image store loads an archive that leaves out layers the engine has
    (labfleet.archives); with None, hosts get whole archives.
    """

    requires_command = "docker"

    def command(self) -> str:
        return (
            "if docker info --format '{{json .DriverStatus}}' | grep -q io.containerd.snapshotter; "
            "then echo containerd; else docker image ls --all --quiet --no-trunc | sort -u "
            "| xargs -r docker image inspect --format '{{json .RootFS.Layers}}'; fi"
        )

    def process(self, output):
        return parse_layer_chains(output)


def parse_layer_chains(lines) -> set[str] | None:
    from labfleet.archives import chain_ids

    if any(line.strip() == "containerd" for line in lines):
        return None
    chains: set[str] = set()
    for line in lines:
        if line.startswith("["):
            chains.update(chain_ids(json.loads(line)))
    return chains


class FreeBytes(FactBase):
    """Free bytes on the filesystem holding path (its nearest existing parent)."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f'p={quoted}; while [ ! -e "$p" ] && [ "$p" != / ]; do p=$(dirname "$p"); done; '
            "df -PB1 \"$p\" | awk 'NR==2 {print $4}'"
        )

    def process(self, output):
        return int(output[0]) if output and output[0].strip().isdigit() else None


# --- NVIDIA ------------------------------------------------------------------------------


class NvidiaRuntimeState(FactBase):
    """What the NVIDIA runtime step decides from, in one round trip.

    + spec: the CDI spec labfleet generates
    + marker: the file that holds the driver version the spec was generated for
    + hook: the command whose presence makes dockerd register its ``nvidia`` GPU driver
    + service: dockerd's systemd unit

    Returns ``{"spec": bool, "spec_driver": str | None, "hook_changed": epoch | None,
    "service_started": epoch | None}``: ``hook_changed`` is the ctime of the hook (set
    when dpkg installs it), ``service_started`` when the unit last became active (None
    when it is not running).
    """

    @staticmethod
    def default():
        return {"spec": False, "spec_driver": None, "hook_changed": None, "service_started": None}

    def command(self, spec: str, marker: str, hook: str, service: str) -> str:
        unit = shlex.quote(service)
        return (
            f"[ -f {shlex.quote(spec)} ] && echo spec; "
            f'echo "spec-driver $(cat {shlex.quote(marker)} 2>/dev/null)"; '
            f'h=$(command -v {shlex.quote(hook)}) && echo "hook-changed $(stat -c %Z "$h")"; '
            f'if [ "$(systemctl is-active {unit} 2>/dev/null)" = active ]; then '
            f"t=$(systemctl show -p ActiveEnterTimestamp --value {unit}); "
            '[ -n "$t" ] && echo "service-started $(date -d "$t" +%s)"; fi; true'
        )

    def process(self, output):
        return parse_nvidia_runtime_state(output)


def parse_nvidia_runtime_state(lines) -> dict:
    state = NvidiaRuntimeState.default()
    for line in lines:
        kind, _, value = line.strip().partition(" ")
        value = value.strip()
        if kind == "spec":
            state["spec"] = True
        elif kind == "spec-driver":
            state["spec_driver"] = value or None
        elif kind in ("hook-changed", "service-started") and value.isdigit():
            state[kind.replace("-", "_")] = int(value)
    return state


class GpuInContainer(FactBase):
    """Runs ``nvidia-smi -L`` and the image's smoke test in one throwaway GPU container.

    + image: the lab image
    + gpus: the value of ``docker run --gpus``

    Returns ``{"rc": int, "output": [lines]}``; rc 0 means the GPU was visible and the
    smoke test passed. Costly (a container start, torch import, a matmul), so it runs
    only when the deploy executes, on GPU hosts.
    """

    def command(self, image: str, gpus: str) -> str:
        check = "nvidia-smi -L && python3 /opt/labfleet/smoke_test.py"
        return (
            f"docker run --rm --gpus {shlex.quote(gpus)} {shlex.quote(image)} sh -c {shlex.quote(check)} 2>&1; "
            'echo "labfleet-rc=$?"'
        )

    def process(self, output):
        return parse_gpu_in_container(output)


def parse_gpu_in_container(lines) -> dict:
    """``{"rc": int, "output": [lines]}`` from GpuInContainer's output (the last ``labfleet-rc=N`` line)."""
    rc, output = 1, []
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
        else:
            output.append(line)
    return {"rc": rc, "output": output}


# --- Read once while planning --------------------------------------------------------------


class Accounts(FactBase):
    """Some host accounts and their home directories, from ``getent``.

    + names: the account names to look up

    Returns ``{name: {"uid", "gid", "group", "home", "home_state"}}`` for the accounts that
    exist: ``group`` is the primary group's name, ``home_state`` ``{"kind", "user",
    "group"}`` (kind ``absent`` when there is no home directory). Far cheaper than pyinfra's
    ``Users`` fact, which runs several commands for every account on the host.
    """

    @staticmethod
    def default():
        return {}

    def command(self, names: tuple[str, ...]) -> str:
        if not names:
            return "true"
        quoted = " ".join(shlex.quote(name) for name in names)
        return (
            f"getent passwd {quoted} | while IFS=: read -r n _ uid gid _ home _; do "
            'g=$(getent group "$gid" | cut -d: -f1); '
            'if [ -L "$home" ]; then k="link - -"; '
            'elif [ -d "$home" ]; then k="directory $(stat -c \'%U %G\' "$home")"; '
            'elif [ -e "$home" ]; then k="other - -"; else k="absent - -"; fi; '
            'echo "account $n $uid $gid ${g:--} $k $home"; done; true'
        )

    def process(self, output):
        accounts = {}
        for line in output:
            parts = line.split(" ", 8)
            if len(parts) == 9 and parts[0] == "account":
                _, name, uid, gid, group, kind, home_user, home_group, home = parts
                accounts[name] = {
                    "uid": uid,
                    "gid": gid,
                    "group": None if group == "-" else group,
                    "home": home,
                    "home_state": {"kind": kind, "user": home_user, "group": home_group},
                }
        return accounts


# What `stat %F` prints, as PathStates names it (anything else is "other").
STAT_KINDS = {"directory": "directory", "symbolic link": "link", "regular file": "file", "regular empty file": "file"}


class PathStates(FactBase):
    """Kind, owner, mode and (for some files) sha1 of several paths, in one command.

    + paths: the paths to look at
    + digests: those of the paths whose sha1 is wanted (the files labfleet uploads)

    Returns ``{path: {"kind", "user", "group", "mode", "sha1"}}`` for the paths that exist:
    kind is ``file``, ``directory``, ``link`` or ``other``; mode is what ``stat -c %a``
    prints (``"2755"``); sha1 is None unless asked for.
    """

    @staticmethod
    def default():
        return {}

    def command(self, paths: tuple[str, ...], digests: tuple[str, ...] = ()) -> str:
        # Two programs whatever the number of paths: one stat for all (a missing path is
        # left out), one sha1sum for the files asked for. User and group names hold no "/".
        if not paths:
            return "true"
        listed = " ".join(shlex.quote(path) for path in paths)
        hashed = " ".join(shlex.quote(path) for path in digests)
        return f"stat --printf 'stat %F/%U/%G/%a/%n\\n' -- {listed}; " + (
            f"sha1sum -- {hashed}; true" if hashed else "true"
        )

    def process(self, output):
        states, sums = {}, {}
        for line in output:
            if line.startswith("stat "):
                parts = line[5:].split("/", 4)
                if len(parts) == 5:
                    kind, user, group, mode, path = parts
                    kind = STAT_KINDS.get(kind, "other")
                    if kind in ("link", "other"):
                        user = group = mode = "-"
                    states[path] = {"kind": kind, "user": user, "group": group, "mode": mode, "sha1": None}
            else:
                digest, _, path = line.partition("  ")
                if len(digest) == 40 and path:
                    sums[path] = digest
        for path, state in states.items():
            if state["kind"] == "file":
                state["sha1"] = sums.get(path)
        return states


def path_is(
    states: dict,
    path: str,
    kind: str,
    user: str | None = None,
    group: str | None = None,
    mode: str | int | None = None,
    sha1: str | None = None,
) -> bool:
    """Whether a PathStates result shows path exactly as asked (None: not asked)."""
    found = states.get(path)
    if not found or found["kind"] != kind:
        return False
    if user is not None and found["user"] != user:
        return False
    if group is not None and found["group"] != group:
        return False
    if mode is not None and not (found["mode"].isdigit() and int(found["mode"], 8) == int(str(mode), 8)):
        return False
    return sha1 is None or found["sha1"] == sha1


_planned: dict[tuple, object] = {}


def _planned_key(fact_class: type[FactBase], kwargs: dict) -> tuple:
    return (id(host.state), host.name, fact_class, repr(sorted(kwargs.items())))


def prefetch(parts) -> None:
    """Read, in one round trip (FactBatch), the facts a step will read while planning.

    + parts: ``((FactClass, {kwargs}), ...)``; those already read are left out

    Later ``planned(FactClass, **kwargs)`` calls get these readings. pyinfra plans every
    operation before running any, so a reading taken while planning is what the host was
    when the run began, for every step.
    """
    if host.state.is_executing:
        return
    wanted = {_planned_key(cls, dict(kwargs)): (cls, dict(kwargs)) for cls, kwargs in parts}
    missing = [part for key, part in wanted.items() if key not in _planned]
    if not missing:
        return
    values = host.get_fact(FactBatch, parts=tuple(missing)) if len(missing) > 1 else None
    for index, (cls, kwargs) in enumerate(missing):
        value = values[index] if values is not None else host.get_fact(cls, **kwargs)
        _planned[_planned_key(cls, kwargs)] = value


def planned(fact_class: type[FactBase], **kwargs):
    """A fact as read while planning, once per host and run (see prefetch); read fresh while executing."""
    if host.state.is_executing:
        return host.get_fact(fact_class, **kwargs)
    prefetch(((fact_class, kwargs),))
    return _planned[_planned_key(fact_class, kwargs)]


def changed_in_this_run() -> bool:
    """Whether an operation has run a command on this host so far in this run."""
    done = host.state.ops.get(host._get_module(), {})
    return any(data.operation_meta.executed for data in done.values())


def unless_current(current: bool):
    """An ``_if`` for an operation that the state read while planning showed has nothing to do.

    Such an operation is still planned, and named in the results, but reads nothing from
    the host when it runs, unless an earlier operation changed this host in this run: then
    it checks, as it always does. It saves the round trips of a run that changes nothing.
    """
    return lambda: not current or changed_in_this_run()


_current_ops_planned: dict[tuple, int] = {}


def worth_planning(current: bool) -> bool:
    """Whether to plan an operation that the state read while planning may show current.

    pyinfra spends milliseconds of the controller's CPU on every operation it plans (it
    walks the call stack to order it), per host: on a fleet, most of a no-change run. So
    an operation shown current is not planned at all while every operation planned before
    it on this host was shown current too: nothing can have changed what planning read.
    Once an operation that may change the host is planned, every later one is planned,
    with ``unless_current``, and checks again when it runs if the host did change.
    """
    if host.state.is_executing:
        return True
    planned_ops = len(host.state.ops.get(host._get_module(), {}))
    if current and planned_ops == _current_ops_planned.get((id(host.state), host.name), 0):
        return False
    if current:
        _count_as_current()
    return True


def _count_as_current() -> None:
    key = (id(host.state), host.name)
    _current_ops_planned[key] = _current_ops_planned.get(key, 0) + 1


def plan_notice(operation, **kwargs):
    """Plan an operation that only tells a person something: it does not make later operations worth planning."""
    result = operation(**kwargs)
    if not host.state.is_executing:
        _count_as_current()
    return result


def plan_unless_current(operation, current: bool, **kwargs):
    """Call operation(**kwargs) unless worth_planning says no; planned, it reads nothing when it runs
    unless this run changed the host first (unless_current). Returns the operation's result or None."""
    if not worth_planning(current):
        return None
    return operation(**kwargs, _if=unless_current(current))
