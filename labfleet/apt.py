"""apt, the way every labfleet step uses it: lock-patient, keyring-signed, pinned, idempotent.

One helper per job, shared by the docker and nvidia steps:

- ``apt_get`` renders an apt-get command that waits for a held apt/dpkg lock instead of
  failing. A freshly booted Ubuntu runs unattended-upgrades, which holds the dpkg lock for
  minutes. apt's own ``DPkg::Lock::Timeout`` covers the dpkg locks of install and remove,
  but not the lists lock that ``apt-get update`` takes (apt 2.6 and 3.0 fail at once), so
  the command also retries while apt reports a lock error, until a deadline.
- ``deb822_source`` renders a ``.sources`` file whose ``Signed-By`` names a keyring under
  /etc/apt/keyrings: the key trusts that repository only (no apt-key, no trusted.gpg.d).
- ``install_keyring`` downloads a repository key on the host and replaces the keyring only
  when the served key differs.
- ``ensure_packages`` / ``remove_packages`` decide from the installed packages (a fact) and
  run apt only for the difference; ``apt-get update`` runs only when something is installed
  or a source changed, so a re-run costs no network and reports no change.
- ``pin_preferences`` renders /etc/apt/preferences.d content that holds packages at one
  version, so an ``apt upgrade`` by hand does not move a pinned engine; ``hold_packages`` is
  the one operation that writes a hold: installed packages at the versions they have (the
  toolkit), or every package at one upstream release, any packaging revision (the driver).
- ``enable_apt_components`` adds components (Debian's non-free for its NVIDIA driver) to the
  distribution's own entries, in deb822 or one-line files, leaving everything else as it is.
- ``AptRepository`` and ``add_repository``: the one step that adds a signed third-party
  repository (Docker's, NVIDIA's): stale files out, prerequisites, key, deb822 source, pin;
  the install that follows refreshes apt only when that changed something.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from labfleet import planning
from labfleet.facts.apt import AptSourceEntries, KeyringDigests

KEYRING_DIR = "/etc/apt/keyrings"
# How long to wait for another apt or dpkg (unattended-upgrades on a fresh boot) to finish.
LOCK_TIMEOUT_S = 900
# What apt prints when another process holds one of its locks (LC_ALL=C).
LOCK_ERRORS = ("Could not get lock", "Unable to lock", "Unable to acquire the dpkg frontend lock")
# What apt prints when an earlier dpkg run was killed half-way (LC_ALL=C).
INTERRUPTED = "dpkg was interrupted"


def apt_get(arguments: str, lock_timeout: int = LOCK_TIMEOUT_S) -> str:
    """A shell command that runs ``apt-get -y <arguments>`` non-interactively, waiting for locks.

    + arguments: what follows ``apt-get -y``, e.g. ``"install --no-install-recommends curl"``
    + lock_timeout: seconds to wait for a lock another process holds before giving up

    A lock error happens before apt changes anything, so retrying is safe. A dpkg run that
    was interrupted earlier is finished with ``dpkg --configure -a`` (twice at most), as
    apt asks, and apt is tried again. Any other failure ends the command at once with
    apt's own output and exit status.
    """
    options = (
        f"-o DPkg::Lock::Timeout={int(lock_timeout)} "
        "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    )
    lock_pattern = "|".join(f"*{shlex.quote(text)}*" for text in LOCK_ERRORS)
    finishing = shlex.quote("labfleet: an earlier dpkg run was interrupted; finishing it with dpkg --configure -a")
    gave_up = shlex.quote(
        f"labfleet: another process still holds the apt/dpkg lock after {int(lock_timeout)} s "
        "(unattended-upgrades after a fresh boot?); let it finish, or stop it, then run the deploy again"
    )
    return (
        f"(deadline=$(( $(date +%s) + {int(lock_timeout)} )); repairs=0; "
        "while :; do "
        f"out=$(LC_ALL=C DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l apt-get -y {options} {arguments} 2>&1); "
        "rc=$?; "
        "if [ $rc -eq 0 ]; then printf '%s\\n' \"$out\"; exit 0; fi; "
        'case "$out" in '
        # A dpkg run that was killed (a controller or a session lost mid-install) leaves
        # packages half-configured, and apt refuses to go on until they are finished.
        f'*{shlex.quote(INTERRUPTED)}*) [ "$repairs" -lt 2 ] || {{ printf \'%s\\n\' "$out" >&2; exit $rc; }}; '
        "repairs=$((repairs + 1)); "
        f"echo {finishing} >&2; "
        "LC_ALL=C DEBIAN_FRONTEND=noninteractive dpkg --force-confdef --force-confold --configure -a >&2; "
        "continue;; "
        f"{lock_pattern}) ;; *) printf '%s\\n' \"$out\" >&2; exit $rc;; esac; "
        f'if [ "$(date +%s)" -ge "$deadline" ]; then printf \'%s\\n\' "$out" >&2; echo {gave_up} >&2; exit 1; fi; '
        'echo "labfleet: waiting for the apt/dpkg lock: $(printf \'%s\\n\' "$out" | grep -m1 lock)" >&2; '
        "sleep 3; "
        "done)"
    )


def apt_update(lock_timeout: int = LOCK_TIMEOUT_S) -> str:
    """``apt-get update`` that fails, with a message, on any source that cannot be read or verified.

    ``APT::Update::Error-Mode=any`` turns apt's warnings (a repository whose signature does
    not match its Signed-By keyring, an index that failed to download) into a failure, so
    a broken source stops this host instead of installing stale or unverified packages.
    """
    explain = shlex.quote(
        "labfleet: apt-get update failed (see apt's messages above): a repository is unreachable, "
        "or its signature does not match the key named by its Signed-By; check the repository URL "
        "and the key it serves"
    )
    update = apt_get("-o APT::Update::Error-Mode=any update", lock_timeout)
    return f"{{ {update} || {{ echo {explain} >&2; exit 1; }}; }}"


def split_version(package: str) -> tuple[str, str | None]:
    """``"docker-ce=5:27.3.1-1"`` -> ``("docker-ce", "5:27.3.1-1")``; no version -> None."""
    name, sep, version = package.partition("=")
    return name, (version if sep else None)


def missing_packages(wanted: Iterable[str], installed: Mapping) -> list[str]:
    """The wanted packages (``name`` or ``name=version``) that are not installed as asked."""
    missing = []
    for package in wanted:
        name, version = split_version(package)
        versions = installed.get(name)
        if not versions or (version is not None and version not in versions):
            missing.append(package)
    return missing


@operation(is_idempotent=True)
def ensure_packages(
    packages: Sequence[str],
    refresh: bool | Callable[[], bool] = False,
    no_recommends: bool = True,
    lock_timeout: int = LOCK_TIMEOUT_S,
):
    """Install the packages that are missing (or at another version than pinned), waiting for apt locks.

    + packages: package names, each optionally ``name=version``
    + refresh: run ``apt-get update`` even when nothing is missing (a source changed); a
      callable is asked when the operation runs, e.g. ``lambda: sources_op.did_change()``
    + no_recommends: leave out recommended packages; list what you need
    + lock_timeout: seconds to wait for a lock another process holds

    **Example:**

    .. code:: python

        ensure_packages(name="Install curl", packages=["curl", "ca-certificates"])
    """
    missing = missing_packages(packages, host.get_fact(DebPackages))
    if not missing and not (refresh() if callable(refresh) else refresh):
        host.noop(f"{', '.join(split_version(p)[0] for p in packages)} already installed")
        return
    yield apt_update(lock_timeout)
    if missing:
        flags = "--no-install-recommends --allow-downgrades" if no_recommends else "--allow-downgrades"
        yield apt_get(f"install {flags} {' '.join(shlex.quote(p) for p in missing)}", lock_timeout)


@operation(is_idempotent=True)
def remove_packages(packages: Sequence[str], lock_timeout: int = LOCK_TIMEOUT_S):
    """Remove those of the packages that are installed (their configuration and data stay).

    + packages: package names
    + lock_timeout: seconds to wait for a lock another process holds

    **Example:**

    .. code:: python

        remove_packages(name="Remove podman-docker", packages=["podman-docker"])
    """
    installed = host.get_fact(DebPackages)
    present = [name for name in packages if name in installed]
    if not present:
        host.noop(f"none of {', '.join(packages)} installed")
        return
    yield apt_get(f"remove {' '.join(shlex.quote(p) for p in present)}", lock_timeout)


def deb822_source(
    uris: str,
    suites: str,
    components: str | None,
    signed_by: str,
    architectures: str | None = None,
    comment: str | None = None,
) -> str:
    """The text of a deb822 ``.sources`` file with one stanza.

    A flat repository (NVIDIA's) has an exact path as its suite, ``"/"``, and no components:
    pass ``components=None``.

    **Example:**

    .. code:: python

        deb822_source("https://download.docker.com/linux/debian", "trixie", "stable",
                      "/etc/apt/keyrings/docker.asc", architectures="amd64")
    """
    lines = [f"# {comment}"] if comment else []
    lines += ["Types: deb", f"URIs: {uris}", f"Suites: {suites}"]
    if components is not None:
        lines.append(f"Components: {components}")
    if architectures:
        lines.append(f"Architectures: {architectures}")
    lines.append(f"Signed-By: {signed_by}")
    return "\n".join(lines) + "\n"


def pin_preferences(packages: Sequence[str], version: str, comment: str | None = None) -> str:
    """/etc/apt/preferences.d text that holds packages at version (priority 1001 also downgrades)."""
    lines = [f"# {comment}"] if comment else []
    lines += [f"Package: {' '.join(packages)}", f"Pin: version {version}", "Pin-Priority: 1001"]
    return "\n".join(lines) + "\n"


def hold_preferences(versions: Mapping[str, str], comment: str | None = None) -> str:
    """/etc/apt/preferences.d text that holds each package at its own version (one stanza per version).

    + versions: package name -> the version it is held at
    """
    stanzas = []
    for version in sorted(set(versions.values())):
        names = sorted(name for name, held in versions.items() if held == version)
        stanzas.append(pin_preferences(names, version).rstrip("\n"))
    return (f"# {comment}\n" if comment else "") + "\n\n".join(stanzas) + "\n"


def installed_versions(packages: Iterable[str], installed: Mapping) -> dict[str, str]:
    """name -> installed version, for those of packages that DebPackages lists."""
    return {name: sorted(installed[name])[-1] for name in packages if installed.get(name)}


def held_versions(packages: Iterable[str], installed: Mapping, release: str | None = None) -> dict[str, str]:
    """name -> the version a hold pins it at.

    + installed: DebPackages; with release None, each installed package is held at its own
      version and those not installed are left out
    + release: an upstream release (``580.95.05``): every package is held at any packaging
      revision of it (``580.95.05-*``), installed or not, so that an install that follows
      gets that release, and a distribution's rebuild of it may still come
    """
    if release is not None:
        return dict.fromkeys(packages, f"{release}-*")
    return installed_versions(packages, installed)


def hold_is_current(
    packages: Sequence[str], path: str, comment: str | None, installed: Mapping, entries: Mapping
) -> bool:
    """Whether path already holds packages at their installed versions, from a step's snapshot.

    + installed: DebPackages
    + entries: an AptSourceEntries reading whose paths include path (``repository_read``)
    """
    versions = installed_versions(packages, installed)
    return not versions or entries["sha256"].get(path) == _sha256(hold_preferences(versions, comment))


@operation(is_idempotent=True)
def hold_packages(packages: Sequence[str], path: str, comment: str | None = None, release: str | None = None):
    """Hold packages against ``apt upgrade`` and unattended-upgrades: at the versions installed now, or at a release.

    + packages: package names; without release, those not installed are left out
    + path: the apt preferences file that holds them (under /etc/apt/preferences.d)
    + comment: the file's first line, saying who wrote it and why
    + release: hold every package at this upstream release, any packaging revision
      (``held_versions``); None: each installed package at its installed version

    A pin at priority 1001 makes the installed version apt's candidate, so ``apt-get
    upgrade``, ``apt upgrade`` and unattended-upgrades (which installs apt's candidates)
    leave the packages where they are. ``apt-mark hold`` stops those too, but it also makes
    every later ``apt-get install`` of the package fail without
    ``--allow-change-held-packages``; a preferences file is plain text, named as labfleet's,
    and moving the packages is one deliberate rewrite of it.

    **Example:**

    .. code:: python

        hold_packages(name="Hold the toolkit", packages=["nvidia-container-toolkit"],
                      path="/etc/apt/preferences.d/labfleet-nvidia-container-toolkit")
        hold_packages(name="Hold the driver", packages=["nvidia-driver", "libcuda1"],
                      path="/etc/apt/preferences.d/labfleet-nvidia-driver", release="580.95.05")
    """
    versions = held_versions(packages, host.get_fact(DebPackages) if release is None else {}, release)
    if not versions:
        host.noop(f"none of {', '.join(packages)} installed: nothing to hold")
        return
    text = hold_preferences(versions, comment)
    if host.get_fact(FileContents, path=path) == text.splitlines():
        host.noop(f"{path} already holds {', '.join(sorted(versions))}" + (f" at {release}" if release else ""))
        return
    yield f"install -d -m 755 {shlex.quote(posixpath.dirname(path))}"
    yield FileUploadCommand(StringIO(text), path)
    yield f"chmod 644 {shlex.quote(path)}"


@operation(is_idempotent=True)
def install_keyring(url: str, path: str):
    """Keep the ASCII-armored repository key served at url in path, replacing it only when it differs.

    + url: where the repository serves its public key
    + path: the keyring a ``Signed-By`` names, ending in ``.asc``

    The host downloads the key (curl or wget), so a mirror that only the lab network
    reaches works. A download that fails, or that is not an armored public key, stops this
    host with a message and leaves the existing keyring alone.

    **Example:**

    .. code:: python

        install_keyring(name="Docker's key", url="https://download.docker.com/linux/debian/gpg",
                        path="/etc/apt/keyrings/docker.asc")
    """
    digests = host.get_fact(KeyringDigests, url=url, path=path)
    if digests["remote"] and digests["remote"] == digests["local"]:
        host.noop(f"{path} already holds the key served at {url}")
        return
    q_url, q_path = shlex.quote(url), shlex.quote(path)
    no_download = shlex.quote(
        f"labfleet: could not download the repository key {url}; check the URL (docker_apt_mirror) "
        "and that this host reaches it"
    )
    not_a_key = shlex.quote(f"labfleet: {url} did not serve an ASCII-armored PGP public key; {path} is unchanged")
    yield (
        f"tmp=$(mktemp) && "
        f'{{ curl -fsSL --max-time 60 {q_url} -o "$tmp" 2>/dev/null || wget -q -T 60 -O "$tmp" {q_url}; }} '
        f'|| {{ rm -f "$tmp"; echo {no_download} >&2; exit 1; }}; '
        f'grep -q \'BEGIN PGP PUBLIC KEY BLOCK\' "$tmp" || {{ rm -f "$tmp"; echo {not_a_key} >&2; exit 1; }}; '
        f'install -d -m 755 {shlex.quote(posixpath.dirname(path))} && install -m 644 "$tmp" {q_path}; '
        'rc=$?; rm -f "$tmp"; exit $rc'
    )


# --- Components of the distribution's own sources -------------------------------------------

_ONE_LINE = re.compile(r"^(\s*deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?\S+\s+)(\S+)((?:\s+[^\s#]+)*)(\s*(?:#.*)?)$")


def add_components(text: str, path: str, suites: Iterable[str], components: Sequence[str]) -> str:
    """text with components added to the entries of suites that have ``main``; all else verbatim.

    + path: decides the format (``.sources`` is deb822, anything else one-line)
    """
    suites = set(suites)
    if path.endswith(".sources"):
        return _add_components_deb822(text, suites, components)
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        match = _ONE_LINE.match(body)
        if match and match.group(2) in suites:
            present = match.group(3).split()
            missing = [c for c in components if c not in present]
            if "main" in present and missing:
                body = match.group(1) + match.group(2) + match.group(3) + " " + " ".join(missing) + match.group(4)
        lines.append(body + line[len(line.rstrip("\n")) :])
    return "".join(lines)


def _add_components_deb822(text: str, suites: set[str], components: Sequence[str]) -> str:
    stanzas = re.split(r"(\n[ \t]*\n)", text)
    for index in range(0, len(stanzas), 2):
        fields = {}
        for line in stanzas[index].splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t", "#")):
                fields[name.strip().lower()] = value.split()
        enabled = (fields.get("enabled") or ["yes"])[0].lower() != "no"
        present = fields.get("components", [])
        missing = [c for c in components if c not in present]
        if enabled and set(fields.get("suites", [])) & suites and "main" in present and missing:
            added = " ".join(missing)
            stanzas[index] = re.sub(
                r"(?im)^(components:[^\n#]*?)[ \t]*$",
                r"\g<1> " + added,
                stanzas[index],
                count=1,
            )
    return "".join(stanzas)


@operation(is_idempotent=True)
def enable_apt_components(path: str, suites: Sequence[str], components: Sequence[str]):
    """Add components to the entries of some suites in an existing apt sources file.

    + path: the file (deb822 ``.sources`` or one-line ``.list``/``sources.list``)
    + suites: the suites whose entries get the components, when they have ``main``
    + components: the components to add

    Everything else in the file (other entries, comments, order) is kept as it is.

    **Example:**

    .. code:: python

        enable_apt_components(name="Enable non-free", path="/etc/apt/sources.list.d/debian.sources",
                              suites=["trixie", "trixie-updates"], components=["non-free"])
    """
    lines = host.get_fact(FileContents, path=path)
    if lines is None:
        host.noop(f"{path} does not exist")
        return
    text = "\n".join(lines) + "\n"
    wanted = add_components(text, path, suites, components)
    if wanted == text:
        host.noop(f"{path} already has {' '.join(components)} where it has main")
        return
    yield FileUploadCommand(StringIO(wanted), path)
    yield f"chmod 644 {shlex.quote(path)}"


# --- A signed third-party repository ---------------------------------------------------------

SOURCES_DIR = "/etc/apt/sources.list.d"
PREFERENCES_DIR = "/etc/apt/preferences.d"
# The distribution's own file: never removed, even when every entry in it is the repository's.
SOURCES_LIST = "/etc/apt/sources.list"


@dataclass(frozen=True)
class AptRepository:
    """A signed third-party apt repository as labfleet keeps it on every host.

    One deb822 file, ``/etc/apt/sources.list.d/<name>.sources``, whose Signed-By names the
    repository's own keyring, ``/etc/apt/keyrings/<name>.asc`` (the key trusts that
    repository only), and with a version set, ``/etc/apt/preferences.d/labfleet-<name>``.
    No other file may name the repository: an old ``.list`` from an install guide, or a
    second copy of its key, makes apt fail with "Conflicting values set for option
    Signed-By".

    + name: the stem of the repository's files
    + owner: who publishes it, for operation names and messages ("Docker")
    + product: what it installs ("Docker Engine"), for the pin's operation name
    + markers: URL fragments that identify an apt entry as this repository's
    + key_files: other places where guides put its key; each is removed
    + pin_packages: the packages that a version pin holds together
    + sources_comment, pin_comment: the first line of the files, saying which settings wrote them

    Everything here is known from the settings alone, so a step can declare what it reads
    (``repository_read``) before it knows the host's release; what depends on the host (its
    URL, suite, architecture) is an ``AptSource``.
    """

    name: str
    owner: str
    product: str
    markers: tuple[str, ...]
    key_files: tuple[str, ...] = ()
    pin_packages: tuple[str, ...] = ()
    sources_comment: str | None = None
    pin_comment: str | None = None

    @property
    def sources_file(self) -> str:
        return f"{SOURCES_DIR}/{self.name}.sources"

    @property
    def keyring(self) -> str:
        return f"{KEYRING_DIR}/{self.name}.asc"

    @property
    def pin_file(self) -> str:
        return f"{PREFERENCES_DIR}/labfleet-{self.name}"


@dataclass(frozen=True)
class AptSource:
    """What a repository's sources file says on one host, once its release and architecture are read.

    + uris, suites, components, architectures: the deb822 fields (``components=None`` for a
      flat repository such as NVIDIA's, whose suite is ``/``)
    + key_url: where the repository serves its public key
    + pin_version: the version its pin_packages are held at; None: no pin
    + hold: with no pin_version, the pin file is the step's own, written after the install
      by ``hold_packages`` at the installed versions: kept, never written here
    """

    uris: str
    suites: str
    components: str | None
    architectures: str | None
    key_url: str
    pin_version: str | None = None
    hold: bool = False


def repository_read(repo: AptRepository) -> planning.Read:
    """The read a step declares (under a name of its choosing) for add_repository's ``entries``."""
    paths = (*repo.key_files, repo.keyring, repo.pin_file, repo.sources_file)
    return planning.Read(AptSourceEntries, {"markers": repo.markers, "paths": tuple(dict.fromkeys(paths))})


def sources_text(repo: AptRepository, source: AptSource) -> str:
    """The text of the repository's sources file on this host."""
    return deb822_source(
        uris=source.uris,
        suites=source.suites,
        components=source.components,
        architectures=source.architectures,
        signed_by=repo.keyring,
        comment=repo.sources_comment,
    )


def pin_text(repo: AptRepository, source: AptSource) -> str | None:
    """The text of the repository's pin file, or None when no version is pinned."""
    if source.pin_version is None:
        return None
    return pin_preferences(repo.pin_packages, source.pin_version, comment=repo.pin_comment)


def _kept(repo: AptRepository, source: AptSource | None) -> set[str]:
    if source is None:
        return set()
    pinned = source.pin_version is not None or source.hold
    return {repo.sources_file, repo.keyring} | ({repo.pin_file} if pinned else set())


def stale_files(repo: AptRepository, source: AptSource | None, entries: Mapping) -> list[str]:
    """The files of this repository that go: every file that names only it (other than the
    sources file labfleet keeps), a key or pin labfleet does not keep; with source None, all.

    + entries: the AptSourceEntries of ``repository_read(repo)``
    """
    keep = _kept(repo, source)
    remove = [
        entry["path"]
        for entry in entries["files"]
        if entry["path"] not in keep and entry["matching"] == entry["entries"] and entry["path"] != SOURCES_LIST
    ]
    return remove + [path for path in entries["present"] if path not in keep and path not in remove]


def mixed_files(repo: AptRepository, source: AptSource | None, entries: Mapping) -> list[str]:
    """The files that mix this repository's entries with other repositories': labfleet does not
    edit them, so the host stops (``mixed_problem``) before anything changes."""
    keep = _kept(repo, source)
    return [
        entry["path"]
        for entry in entries["files"]
        if entry["path"] not in keep and (entry["matching"] != entry["entries"] or entry["path"] == SOURCES_LIST)
    ]


def mixed_problem(repo: AptRepository, host_name: str, mixed: Sequence[str]) -> str:
    """The message that stops a host whose apt files mix this repository's entries with others'."""
    return (
        f"host {host_name}: {', '.join(mixed)} mixes {repo.owner}'s apt entries with other repositories'; "
        f"labfleet does not edit other repositories' files: move {repo.owner}'s entries out (labfleet writes "
        f"{repo.sources_file}), then run the deploy again"
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def add_repository(
    repo: AptRepository, source: AptSource | None, entries: Mapping, installed: Mapping
) -> Callable[[], bool]:
    """Plan the repository's files on this host; with source None, plan their removal.

    + repo: the repository
    + source: what its sources file says here, or None where the repository is not wanted
    + entries: the AptSourceEntries of ``repository_read(repo)``, from the step's snapshot
    + installed: the DebPackages of the step's snapshot (for curl and ca-certificates)

    The step has stopped the host already when ``mixed_files`` found any. Returns a callable
    that tells, when the packages are installed, whether this run changed the repository,
    for ``ensure_packages(refresh=...)``: apt's lists are refreshed only then.

    **Example:**

    .. code:: python

        changed = add_repository(DOCKER, source, state.apt_files, state.packages)
        ensure_packages(name="Install Docker Engine packages", packages=packages, refresh=changed)
    """
    changes: list[OperationMeta | None] = [
        files.file(name=f"Remove {repo.owner}'s stale apt file {path}", path=path, present=False)
        for path in stale_files(repo, source, entries)
    ]
    if source is not None:
        prerequisites = ["ca-certificates"] + ([] if {"curl", "wget"} & set(installed) else ["curl"])
        planning.unless_current(
            ensure_packages,
            current=not missing_packages(prerequisites, installed),
            name="Install ca-certificates and curl",
            packages=prerequisites,
        )
        # Always planned: only the host can tell whether the served key changed.
        changes.append(
            install_keyring(name=f"Install {repo.owner}'s repository key", url=source.key_url, path=repo.keyring)
        )
        wanted = {repo.sources_file: (f"Add {repo.owner}'s apt repository", sources_text(repo, source))}
        pin = pin_text(repo, source)
        if pin is not None:
            wanted[repo.pin_file] = (f"Pin {repo.product} to {source.pin_version}", pin)
        for path, (title, text) in wanted.items():
            changes.append(
                planning.unless_current(
                    files.put,
                    current=entries["sha256"].get(path) == _sha256(text),
                    name=title,
                    src=StringIO(text),
                    dest=path,
                    mode="644",
                )
            )
    planned = [change for change in changes if change is not None]
    return lambda: any(change.did_change() for change in planned)
