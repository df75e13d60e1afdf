"""The settings model: what every setting is, how its value is checked, and the frozen views steps read.

This module imports nothing from the rest of labfleet, so any module may import it without
a cycle. `labfleet.settings` reads host.data and validates it against the declarations here;
`labfleet.checks` holds the checks that relate settings to each other, to the inventory and to
the controller's files.

Add a setting in two places:

1. group_data/all.py: its default, with a one-line comment above it;
2. here, one field of `Settings` whose metadata is ``setting(check, expected)``: the check
   turns the raw value into the typed one or raises `Invalid`, and the expected form is what
   the error message shows.

A value that depends on other settings (a derived default) is filled in by
``labfleet.settings.build``; a key that only feeds other fields goes into `INPUT_ONLY`.
tests/unit/test_settings.py checks that group_data/all.py and the declarations list the same keys.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS_DIR = REPO_ROOT / "container" / "requirements"

# The driver floor of each CUDA line (used when nvidia_driver_min is not set), by one rule:
# NVIDIA's CUDA minor-version compatibility (CUDA Compatibility guide, "Minor Version
# Compatibility"): a CUDA 11.x runtime runs from driver 450.80.02, 12.x from 525.60.13, 13.x
# from R580 (580.65.06, the first R580 release, shipped with CUDA 13.0). The image's wheels
# carry their own runtime, so the major line alone sets the floor. GPUs that need a newer
# driver than this (Blackwell: 570 and the open modules) are checked per host
# (labfleet.nvidia_driver).
MINOR_VERSION_COMPATIBILITY = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
CUDA_DRIVER_FLOOR = {
    cuda: MINOR_VERSION_COMPATIBILITY[cuda.split(".")[0]]
    for cuda in ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")
}


# --- Checks of single values ------------------------------------------------------------
# Each returns the normalised value or raises Invalid with a short detail; the caller adds
# the host, the key, the value and the expected form to the message.


class Invalid(ValueError):
    """A value does not have the expected form."""


_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PACKAGE_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_PACKAGE_SPEC = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[0-9][A-Za-z0-9.+~:-]*)?$")
_DRIVER_VERSION = re.compile(r"^\d{3}(\.\d{1,3}){0,2}$")
_DRIVER_RELEASE = re.compile(r"^\d{3}\.\d{1,3}(\.\d{1,3})?$")
_SIZE = re.compile(r"^[1-9][0-9]*(b|k|kb|m|mb|g|gb)?$", re.IGNORECASE)
_ARGON2 = re.compile(r"^(argon2:)?\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IMAGE_REF = re.compile(
    r"^(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_DEVICE_ID = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]{36}|MIG-[0-9a-fA-F-]{36})$")


def choice(*allowed):
    def check(value):
        # bool is an int in Python: compare type as well so 1 is not true.
        for option in allowed:
            if type(value) is type(option) and value == option:
                return value
        raise Invalid("")

    return check


def optional(inner):
    def check(value):
        return None if value is None else inner(value)

    return check


def list_of(inner):
    def check(value):
        if not isinstance(value, (list, tuple)):
            raise Invalid("not a list")
        out = []
        for index, item in enumerate(value):
            try:
                out.append(inner(item))
            except Invalid as exc:
                raise Invalid(f"item {index} {item!r}" + (f": {exc}" if str(exc) else "")) from None
        return tuple(out)

    return check


def _string(value) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("not a non-empty string")
    if any(ch in value for ch in "\n\r\0"):
        raise Invalid("contains a newline or NUL")
    return value


def boolean(value):
    if not isinstance(value, bool):
        raise Invalid("")
    return value


def port(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Invalid("")
    return value


def fanout(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise Invalid("")
    return value


def username(value):
    if not isinstance(value, str) or not _USERNAME.match(value):
        raise Invalid("")
    return value


def package_version(value):
    if not isinstance(value, str) or not _PACKAGE_VERSION.match(value):
        raise Invalid("")
    return value


def package_spec(value):
    """A Debian package name, optionally pinned: ``docker.io`` or ``docker-ce=5:27.3.1-1~debian.13~trixie``."""
    if not isinstance(value, str) or not _PACKAGE_SPEC.match(value):
        raise Invalid("")
    return value


# The NVIDIA Container Toolkit's security floor: 1.16.2 fixed CVE-2024-0132 and 1.17.8 fixed
# CVE-2025-23266, both container escapes (NVIDIA's security bulletins for the toolkit).
TOOLKIT_FLOOR = "1.17.8"
TOOLKIT_FLOOR_REASON = (
    "1.17.8 is the first release with the fix for CVE-2025-23266 (a container escape; "
    "CVE-2024-0132 was fixed in 1.16.2)"
)
_RELEASE = re.compile(r"^(?:\d+:)?(\d+(?:\.\d+)*)(.*)$")


def release_below(version: str, floor: str) -> bool:
    """Whether a Debian package version's upstream release is below floor.

    ``"1.17.7-1"`` and ``"1.17.8~rc.1-1"`` (a pre-release sorts before its release, as
    dpkg sorts ``~``) are below ``"1.17.8"``; ``"1.17.8-1"`` and ``"1:1.18.0-1"`` are not.
    """
    match = _RELEASE.match(version)
    if not match:
        return True
    numbers = [int(part) for part in match.group(1).split(".")]
    wanted = [int(part) for part in floor.split(".")]
    width = max(len(numbers), len(wanted))
    numbers += [0] * (width - len(numbers))
    wanted += [0] * (width - len(wanted))
    return numbers < wanted or (numbers == wanted and match.group(2).startswith("~"))


def toolkit_version(value):
    """A toolkit package version at or above TOOLKIT_FLOOR: an older one is a known container escape."""
    package_version(value)
    if release_below(value, TOOLKIT_FLOOR):
        raise Invalid(f"it is below {TOOLKIT_FLOOR}: {TOOLKIT_FLOOR_REASON}")
    return value


def driver_version(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _DRIVER_VERSION.match(value):
        raise Invalid("")
    return value


def driver_release(value):
    """A whole driver release (``580.95.05``), as package versions carry it; a branch alone is not one."""
    if not isinstance(value, str) or not _DRIVER_RELEASE.match(value):
        raise Invalid("")
    return value


def release_key(version: str) -> tuple[int, ...]:
    """``"580.95.05"`` -> ``(580, 95, 5)``: driver releases compare part by part, and a branch
    (``"570"``) sorts below every release of it."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def url(value):
    _string(value)
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and parsed.netloc and " " not in value:
        return value.rstrip("/")
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        return value.rstrip("/")
    raise Invalid("")


def absolute_path(value):
    _string(value)
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts:
        raise Invalid("not absolute, or contains ..")
    if str(path) == "/":
        raise Invalid("the root directory")
    return str(path)


def workspace_dir(value):
    path = absolute_path(value)
    leftover = path.replace("{user}", "")
    if "{" in leftover or "}" in leftover:
        raise Invalid("the only placeholder allowed is {user}")
    return path


# The Settings class has a field of that name; its own fields use this one.
user_path = workspace_dir


def ip_address(value):
    _string(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid("") from None


def argon2_hash(value):
    _string(value)
    if not _ARGON2.match(value):
        raise Invalid("")
    return value if value.startswith("argon2:") else "argon2:" + value


def size(value):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if not isinstance(value, str) or not _SIZE.match(value):
        raise Invalid("")
    return value.lower()


def json_object(value):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise Invalid("")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise Invalid(f"not JSON-serialisable: {exc}") from None
    return dict(value)


def registry(value):
    _string(value)
    host, _, rest = value.partition("/")
    name, _, port_text = host.partition(":")
    if "://" in value or not _HOSTNAME.match(name):
        raise Invalid("give host[:port], without a scheme")
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise Invalid("bad port")
    if rest and not re.match(r"^[a-z0-9._/-]+$", rest):
        raise Invalid("bad path")
    return value


def image_reference(value):
    _string(value)
    if not _IMAGE_REF.match(value):
        raise Invalid("")
    return value


def pem_file(value):
    _string(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise Invalid("no such file on the controller")
    if b"-----BEGIN CERTIFICATE-----" not in path.read_bytes():
        raise Invalid("not a PEM certificate")
    return str(path.resolve())


def gpu_devices(value):
    if value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise Invalid("a count must be at least 1")
        return value
    if isinstance(value, (list, tuple)) and value:
        ids = tuple(str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
        for item in ids:
            if not isinstance(item, str) or not _DEVICE_ID.match(item):
                raise Invalid(f"device id {item!r} is not an index or a GPU-/MIG- UUID")
        return ids
    raise Invalid("")


def profile(available):
    def check(value):
        if not isinstance(value, str) or value not in available():
            raise Invalid("available: " + ", ".join(available()))
        return value

    return check


def dataset_name(value):
    if not isinstance(value, str) or not _DATASET_NAME.match(value) or value in (".", ".."):
        raise Invalid(f"dataset name {value!r} must be letters, digits, '.', '_' or '-', without '/', '..' or spaces")
    return value


def host_address(value):
    _string(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise Invalid("not an IP address or a DNS name")
    return value


# --- Datasets -----------------------------------------------------------------------------

SOURCE_FORMS = "manual, local:<path>, host:<inventory host>:</path>, nfs:<server>:</export> or s3:<bucket>[/<prefix>]"
# S3's rule for bucket names: 3 to 63 lowercase letters, digits, dots and hyphens, a letter or
# digit at each end.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
S3_KEYS = ("s3_endpoint", "s3_credentials_file")
# The one profile of an s3_credentials_file, in the AWS credentials file's own names.
S3_CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key")
S3_OPTIONAL_KEYS = ("region",)
S3_CREDENTIALS_FORM = (
    "a file on the controller with one profile, e.g. [default] with aws_access_key_id = ... and "
    "aws_secret_access_key = ... (region = ... optional)"
)


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from, parsed once while the settings are validated.

    ``kind`` is one of "manual", "local", "host", "nfs", "s3"; ``text`` is the setting as
    written (a local path resolved on the controller). ``path`` is the controller's directory
    for local:, the peer's directory for host: and the key prefix for s3: ("" for the whole
    bucket); ``peer`` names the inventory host of host:; ``server`` and ``export`` are those of
    nfs:; ``bucket``, ``endpoint`` and ``credentials_file`` (a controller path, never the
    secret itself) are those of s3:. The fields a kind does not use are None.
    """

    kind: str
    text: str
    path: str | None = None
    peer: str | None = None
    server: str | None = None
    export: str | None = None
    bucket: str | None = None
    endpoint: str | None = None
    credentials_file: str | None = None

    def __str__(self) -> str:
        return self.text


def dataset_source(value: Any) -> Source:
    _string(value)
    kind, _, rest = value.partition(":")
    if value == "manual":
        return Source("manual", value)
    if kind == "local" and rest:
        # Checked here, on the controller, so that a typo stops the run before any host is touched.
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise Invalid(f"local source {rest!r} is not a directory on the controller")
        resolved = str(path.resolve())
        return Source("local", f"local:{resolved}", path=resolved)
    if kind == "host":
        peer, _, peer_path = rest.partition(":")
        if peer and peer_path.startswith("/"):
            return Source("host", value, path=peer_path, peer=peer)
    if kind == "nfs":
        server, _, export = rest.partition(":")
        if server and export.startswith("/"):
            return Source("nfs", value, server=server, export=export)
    if kind == "s3":
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise Invalid(
                f"source {value!r}: bucket {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, "
                "digits, '.' and '-'); the form is s3:<bucket>[/<prefix>]"
            )
        prefix = prefix.strip("/")
        if "//" in prefix or ".." in prefix.split("/"):
            raise Invalid(
                f"source {value!r}: prefix {prefix!r} must not hold '//' or '..'; the form is s3:<bucket>[/<prefix>]"
            )
        return Source("s3", f"s3:{bucket}/{prefix}" if prefix else f"s3:{bucket}", path=prefix, bucket=bucket)
    raise Invalid(f"source {value!r} must be {SOURCE_FORMS}")


def s3_credentials(path: str) -> dict[str, str]:
    """The access key of an s3_credentials_file: its one profile's keys (an AWS credentials file).

    Shared by the validation (before any host is touched) and labfleet.datasets_s3, which
    writes the host's rclone config from it. The messages never quote a value of the file.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except configparser.MissingSectionHeaderError:
        raise Invalid(f"{path} has no [profile] line before its keys") from None
    except (configparser.DuplicateOptionError, configparser.DuplicateSectionError):
        raise Invalid(f"{path} names a key or a profile twice") from None
    except (configparser.Error, UnicodeDecodeError):
        # configparser's own message quotes the line, which may be the secret.
        raise Invalid(f"{path} has a line that is not 'key = value' or '[profile]'") from None
    profiles = parser.sections()
    if len(profiles) != 1:
        raise Invalid(f"{path} must hold exactly one profile such as [default], not {len(profiles)}")
    profile = parser[profiles[0]]
    unknown = sorted(set(profile) - set(S3_CREDENTIAL_KEYS) - set(S3_OPTIONAL_KEYS))
    if unknown:
        raise Invalid(f"{path}: profile [{profiles[0]}] has unknown keys {unknown}")
    values = {}
    for key in (*S3_CREDENTIAL_KEYS, *S3_OPTIONAL_KEYS):
        value = profile.get(key, "").strip()
        if key in S3_CREDENTIAL_KEYS and not value:
            raise Invalid(f"{path}: profile [{profiles[0]}] has no {key}")
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise Invalid(f"{path}: the value of {key} holds spaces or control characters")
        if value:
            values[key] = value
    return values


def _s3_source(name: str, source: Source, spec: dict) -> Source:
    given = [key for key in S3_KEYS if key in spec]
    if source.kind != "s3":
        if given:
            verb = "belong" if len(given) > 1 else "belongs"
            raise Invalid(
                f"dataset {name!r}: {' and '.join(given)} {verb} to an s3: source only, not to {source.text!r}"
            )
        return source
    missing = [key for key in S3_KEYS if key not in spec]
    if missing:
        raise Invalid(f"dataset {name!r}: an s3: source needs {' and '.join(missing)}")
    endpoint = spec["s3_endpoint"]
    try:
        parsed = urlparse(_string(endpoint))
        if parsed.scheme not in ("http", "https") or not parsed.hostname or " " in endpoint:
            raise Invalid("")
        parsed.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except (Invalid, ValueError):
        raise Invalid(
            f"dataset {name!r}: s3_endpoint {endpoint!r} is not an http:// or https:// URL like https://s3.lab:9000"
        ) from None
    credentials = spec["s3_credentials_file"]
    try:
        path = Path(_string(credentials)).expanduser()
        if not path.is_file():
            raise Invalid(f"{str(credentials)!r} is no such file on the controller")
        s3_credentials(str(path))
    except Invalid as exc:
        raise Invalid(f"dataset {name!r}: s3_credentials_file: {exc}; expected {S3_CREDENTIALS_FORM}") from None
    return dataclasses.replace(source, endpoint=endpoint.rstrip("/"), credentials_file=str(path.resolve()))


@dataclass(frozen=True)
class Dataset:
    name: str
    source: Source
    readonly: bool = True
    prune: bool = False
    manifest: str | None = None


def datasets(value: Any) -> tuple[Dataset, ...]:
    if not isinstance(value, dict):
        raise Invalid("not a mapping")
    out = []
    for name, spec in value.items():
        dataset_name(name)
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict):
            raise Invalid(f"dataset {name!r} must be a mapping with a source")
        unknown = set(spec) - {"source", "readonly", "prune", "manifest", *S3_KEYS}
        if unknown:
            raise Invalid(f"dataset {name!r} has unknown keys {sorted(unknown)}")
        if "source" not in spec:
            raise Invalid(f"dataset {name!r} has no source")
        try:
            readonly = boolean(spec.get("readonly", True))
            prune = boolean(spec.get("prune", False))
        except Invalid:
            raise Invalid(f"dataset {name!r}: readonly and prune must be true or false") from None
        manifest = spec.get("manifest")
        if manifest is not None:
            _string(manifest)
            parts = PurePosixPath(manifest).parts
            if manifest.startswith("/") or ".." in parts:
                raise Invalid(f"dataset {name!r}: manifest {manifest!r} must be a path inside the dataset (SHA256SUMS)")
        source = _s3_source(name, dataset_source(spec["source"]), spec)
        if source.kind == "nfs" and not readonly:
            raise Invalid(f"dataset {name!r}: an nfs: source is mounted read-only; remove readonly: false")
        out.append(Dataset(name, source, readonly, prune, manifest))
    return tuple(out)


# --- Per-user environment, secrets and home ------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables the compose project or the entrypoint sets itself; a setting may not replace them.
RESERVED_ENV = frozenset(
    {
        *("NB_USER", "NB_UID", "NB_GID", "NB_GROUP", "HOME", "USER", "LOGNAME", "SHELL", "PATH"),
        *("JUPYTER_TOKEN_FILE", "JUPYTER_PASSWORD_HASH_FILE", "WORKSPACE_DIR", "DATASET_DIR"),
        *("LABFLEET_SECRETS", "VIRTUAL_ENV"),
        # the names of the token and password files under /run/secrets
        *("jupyter_token", "jupyter_password_hash"),
    }
)


def env_name(value):
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise Invalid(f"name {value!r} is not an environment variable name (letters, digits, _; not first a digit)")
    if value in RESERVED_ENV or value.startswith("LABFLEET_"):
        raise Invalid(f"name {value!r} is set by labfleet itself; choose another name")
    return value


def environment(value) -> tuple[tuple[str, str], ...]:
    """Plain variables: name -> a string or a number, kept as the text the container sees."""
    if not isinstance(value, dict):
        raise Invalid("not a mapping")
    out = []
    for name, item in value.items():
        env_name(name)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise Invalid(f"{name} = {item!r} is a {type(item).__name__}; expected a string or a number")
        text = str(item)
        if any(ch in text for ch in "\n\r\0"):
            raise Invalid(f"{name} contains a newline or NUL")
        out.append((name, text))
    return tuple(sorted(out))


def secret_files(value) -> tuple[tuple[str, str], ...]:
    """Secrets: name -> a file on the controller, checked here so a typo stops the run before any host."""
    if not isinstance(value, dict):
        raise Invalid("not a mapping")
    out = []
    for name, path in value.items():
        env_name(name)
        if not isinstance(path, str) or not path:
            raise Invalid(f"{name} = {path!r} is not a file path")
        local = Path(path).expanduser()
        if not local.is_file():
            raise Invalid(f"{name}: {path} is not a file on the controller; create it or fix the path")
        out.append((name, str(local.resolve())))
    return tuple(sorted(out))


@dataclass(frozen=True)
class UserEntry:
    """One jupyter_users entry as written; None means the host's setting applies."""

    name: str
    port: int | None = None
    home_dir: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[tuple[str, str], ...] = ()


USER_KEYS = ("name", "port", "home_dir", "env", "secrets")


def jupyter_user_entry(value):
    if isinstance(value, str):
        return UserEntry(username(value))
    if isinstance(value, dict) and set(value) <= set(USER_KEYS) and "name" in value:
        name = username(value["name"])
        checks = {"port": port, "home_dir": user_path, "env": environment, "secrets": secret_files}
        found: dict[str, Any] = {}
        for key, check in checks.items():
            if key in value:
                try:
                    found[key] = check(value[key])
                except Invalid as exc:
                    detail = f": {exc}" if str(exc) else ""
                    raise Invalid(f"user {name}: {key} {value[key]!r} is invalid{detail}") from None
        return UserEntry(name, **found)
    raise Invalid("expected a user name or a mapping of " + ", ".join(USER_KEYS))


ULIMIT_NAMES = frozenset(
    {
        *("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice"),
        *("nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"),
    }
)


def ulimits(value):
    if not isinstance(value, dict):
        raise Invalid("not a mapping")
    for name, limit in value.items():
        if name not in ULIMIT_NAMES:
            raise Invalid(f"unknown ulimit {name!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
            raise Invalid(f"{name} must be an integer, -1 for unlimited")
    return dict(value)


_DURATION = re.compile(r"^(\d+[smhd])+$")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value):
    """A duration like "30m", "2h", "1h30m" or "90s", as seconds."""
    if not isinstance(value, str) or not _DURATION.match(value):
        raise Invalid("")
    return sum(int(count) * _SECONDS[unit] for count, unit in _DURATION_PART.findall(value))


def cull_idle(value):
    """jupyter_cull_idle as seconds: a duration like "24h", or "off" (0: kernels are never culled)."""
    if value == "off":
        return 0
    seconds = duration(value)
    if seconds == 0:
        raise Invalid('a zero duration; write "off" to keep idle kernels')
    return seconds


def listen_address(value):
    _string(value)
    address, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Invalid("")
    if address not in ("", "0.0.0.0", "[::]"):
        ip_address(address.strip("[]"))
    return value


# --- Backups (labfleet.backup) ------------------------------------------------------------------

REPOSITORY_FORMS = "an absolute path (or local:/path), sftp:[user@]host:/path or sftp://[user@]host[:port]//path"
_SFTP_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Repository:
    """A restic repository as restic is given it (``text``), parsed once while the settings are validated.

    ``kind`` is "local" or "sftp"; ``path`` is the repository's directory (on this host for
    local, on ``server`` for sftp); ``user`` and ``port`` are None when the URL leaves them out.
    """

    kind: str
    text: str
    path: str
    server: str | None = None
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return self.text


def _repository_path(path: str) -> str:
    if not path.startswith("/") or ".." in PurePosixPath(path).parts or any(ch in path for ch in " '\"\\$`"):
        raise Invalid(f"the path {path!r} is not an absolute path without spaces, quotes or ..")
    return path


def backup_repository(value: Any) -> Repository:
    """The restic repository forms labfleet supports; restic's other backends are refused by name."""
    _string(value)
    if value.startswith("/") or value.startswith("local:"):
        path = _repository_path(value.removeprefix("local:"))
        return Repository("local", value, path)
    if value.startswith("sftp://"):
        parsed = urlparse(value)
        try:
            port_number = parsed.port
        except ValueError:
            raise Invalid("bad port") from None
        if not parsed.hostname or not parsed.path.startswith("//"):
            raise Invalid("sftp:// needs a host and an absolute path after a double slash: sftp://nas.lab//srv/restic")
        server = host_address(parsed.hostname)
        if parsed.username is not None and not _SFTP_USER.match(parsed.username):
            raise Invalid(f"bad user {parsed.username!r}")
        return Repository("sftp", value, _repository_path(parsed.path[1:]), server, parsed.username, port_number)
    if value.startswith("sftp:"):
        rest = value.removeprefix("sftp:")
        login, sep, path = rest.partition(":")
        if not sep or not login:
            raise Invalid("sftp: needs host:/path")
        user, at, server = login.rpartition("@")
        if at and not _SFTP_USER.match(user):
            raise Invalid(f"bad user {user!r}")
        return Repository("sftp", value, _repository_path(path), host_address(server), user if at else None)
    scheme = value.partition(":")[0]
    if re.match(r"^[a-z0-9]+$", scheme) and ":" in value:
        raise Invalid(f"{scheme}: repositories are not supported; use a local path or sftp:")
    raise Invalid("not an absolute path nor an sftp: URL")


def controller_file(value: Any) -> str:
    """A file on the controller, checked here so that a typo stops the run before any host."""
    _string(value)
    local = Path(value).expanduser()
    if not local.is_file():
        raise Invalid("no such file on the controller; create it or fix the path")
    return str(local.resolve())


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_CALENDAR_WORDS = {
    "minutely": 60,
    "hourly": 3600,
    "daily": 86400,
    "weekly": 7 * 86400,
    "monthly": 31 * 86400,
    "quarterly": 92 * 86400,
    "semiannually": 184 * 86400,
    "yearly": 366 * 86400,
    "annually": 366 * 86400,
}
SCHEDULE_FORMS = (
    'a systemd calendar: "hourly", "daily", "weekly", "monthly", or "[weekdays] [*-*-*] HH:MM[:SS]" '
    'such as "*-*-* 02:30" or "Mon..Fri 22:00" (hours may be a list "0,12" or a step "0/6")'
)


@dataclass(frozen=True)
class Schedule:
    """A backup_schedule: the OnCalendar text and the longest time between two of its runs (seconds)."""

    text: str
    period: int

    def __str__(self) -> str:
        return self.text


def _numbers(text: str, top: int) -> list[int]:
    if text == "*":
        return list(range(top))
    if "/" in text:
        start, _, step = text.partition("/")
        if not (start.isdigit() and step.isdigit() and int(step) > 0 and int(start) < top):
            raise Invalid(f"bad repetition {text!r}")
        return list(range(int(start), top, int(step)))
    values = [int(part) for part in text.split(",") if part.isdigit() and len(part) <= 2]
    if len(values) != len(text.split(",")) or any(v >= top for v in values):
        raise Invalid(f"bad value {text!r}")
    return sorted(set(values))


def _weekdays(text: str) -> list[int]:
    days: set[int] = set()
    for part in text.split(","):
        first, dots, last = part.partition("..")
        if first not in _WEEKDAYS or (dots and last not in _WEEKDAYS):
            raise Invalid(f"bad weekday {part!r}; use Mon..Sun")
        a, b = _WEEKDAYS.index(first), _WEEKDAYS.index(last if dots else first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(b + 1)])
    return sorted(days)


def backup_schedule(value: Any) -> Schedule:
    """The calendar forms labfleet can check here and whose period it knows (status calls a
    snapshot older than twice the period drift); systemd accepts more, which are refused."""
    _string(value)
    if value in _CALENDAR_WORDS:
        return Schedule(value, _CALENDAR_WORDS[value])
    words = value.split()
    days = list(range(7))
    if words and words[0][:3] in _WEEKDAYS:
        days = _weekdays(words.pop(0))
    if words and words[0] == "*-*-*":
        words.pop(0)
    if len(words) != 1:
        raise Invalid("")
    fields = words[0].split(":")
    if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in ("0", "00")):
        raise Invalid("give HH:MM or HH:MM:00")
    hours, minutes = _numbers(fields[0], 24), _numbers(fields[1], 60)
    if fields[1] == "*" or "/" in fields[1]:
        raise Invalid("minutes must be numbers")
    runs = sorted(day * 1440 + hour * 60 + minute for day in days for hour in hours for minute in minutes)
    gaps = [b - a for a, b in itertools.pairwise(runs)] + [runs[0] + 7 * 1440 - runs[-1]]
    return Schedule(value, max(gaps) * 60)


KEEP_KINDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def backup_keep(value: Any) -> tuple[tuple[str, int], ...]:
    """Retention as restic's --keep-<kind> N options, in restic's order."""
    if not isinstance(value, dict) or not value:
        raise Invalid("not a non-empty mapping")
    for kind, count in value.items():
        if kind not in KEEP_KINDS:
            raise Invalid(f"unknown kind {kind!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise Invalid(f"{kind} = {count!r} is not a count >= 1")
    return tuple((kind, value[kind]) for kind in KEEP_KINDS if kind in value)


def restore_from(value: Any) -> str:
    """ "backup" (this host's own snapshots) or "backup:<host>" (a host that may be gone from the inventory)."""
    _string(value)
    if value == "backup":
        return value
    kind, sep, name = value.partition(":")
    if kind == "backup" and sep and _HOSTNAME.match(name):
        return value
    raise Invalid("")


# --- Image profiles and their locks ----------------------------------------------------------


def profiles() -> tuple[str, ...]:
    """The requirement profiles: container/requirements/<profile>.in."""
    return tuple(sorted(p.stem for p in REQUIREMENTS_DIR.glob("*.in")))


def lock_file(profile: str, cuda: str) -> Path | None:
    """The lock the image build installs for this profile and CUDA line, or None when there is none.

    <profile>-cu<NNN>.txt for a profile locked per CUDA line, else <profile>.txt for one whose
    lock serves every line. Its stem is the Dockerfile's LOCK (image.build_args).
    """
    for name in (f"{profile}-cu{cuda.replace('.', '')}.txt", f"{profile}.txt"):
        if (REQUIREMENTS_DIR / name).is_file():
            return REQUIREMENTS_DIR / name
    return None


def locked_cudas(profile: str) -> tuple[str, ...]:
    """The CUDA lines of CUDA_DRIVER_FLOOR that have a lock for this profile."""
    return tuple(cuda for cuda in CUDA_DRIVER_FLOOR if lock_file(profile, cuda))


# --- The model --------------------------------------------------------------------------------

SETTING = "labfleet.setting"


@dataclass(frozen=True)
class Setting:
    """How one key of group_data/all.py is checked, and the form its error message asks for."""

    check: Callable[[Any], Any]
    expected: str


def setting(check: Callable[[Any], Any], expected: str) -> dict[str, Setting]:
    """A Settings field's metadata: ``field(metadata=setting(check, expected))``."""
    return {SETTING: Setting(check, expected)}


def _one_of(*options: str) -> str:
    return "one of " + ", ".join(f'"{option}"' for option in options)


URL = "an http(s):// or file:/ URL"
PORT = "an integer port 1-65535"


@dataclass(frozen=True)
class JupyterUser:
    """One compose project: a host account, its published port, its workspace and home,
    and its environment: the host's jupyter_env and jupyter_secrets with the user's own on top."""

    name: str
    port: int
    workspace_dir: str
    home_dir: str = ""
    env: tuple[tuple[str, str], ...] = ()
    # name -> the file on the controller that holds the value
    secrets: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Settings:
    """One host's settings, validated and typed: the only view of host.data that steps read.

    Each field with ``setting`` metadata is the group_data/all.py key of the same name.
    nvidia_driver_min, lan_address, lan_ssh_port and jupyter_users are completed from other
    settings when left unset (labfleet.settings.build); host and groups come from the inventory.
    """

    host: str
    gpu: str | bool = field(metadata=setting(choice("auto", True, False), 'one of "auto", true, false'))
    gpu_devices: str | int | tuple[str, ...] = field(
        metadata=setting(gpu_devices, '"all", a GPU count >= 1, or a list of device ids')
    )
    docker_source: str = field(metadata=setting(choice("docker-ce", "distro"), _one_of("docker-ce", "distro")))
    docker_apt_mirror: str = field(metadata=setting(url, URL))
    docker_version: str | None = field(metadata=setting(optional(package_version), "null or a version like 5:27.3.1"))
    docker_packages: tuple[str, ...] | None = field(
        metadata=setting(
            optional(list_of(package_spec)),
            'null (the source\'s default list) or a list of package names, each optionally "name=version"',
        )
    )
    docker_users: tuple[str, ...] = field(metadata=setting(list_of(username), "a list of user names"))
    docker_daemon: dict = field(metadata=setting(json_object, "a mapping of daemon.json keys to JSON values"))
    nvidia_toolkit: str | bool = field(metadata=setting(choice("auto", True, False), 'one of "auto", true, false'))
    nvidia_toolkit_apt_mirror: str = field(metadata=setting(url, URL))
    nvidia_toolkit_apt_key: str | None = field(metadata=setting(optional(url), "null or " + URL))
    nvidia_toolkit_version: str | None = field(
        metadata=setting(optional(toolkit_version), f"null or a version like 1.17.8-1, at least {TOOLKIT_FLOOR}")
    )
    nvidia_default_runtime: bool = field(metadata=setting(boolean, "true or false"))
    # None in group_data/all.py means the floor of the cuda line (CUDA_DRIVER_FLOOR).
    nvidia_driver_min: str = field(
        metadata=setting(optional(driver_version), 'null or a driver version like "570" or "525.60.13"')
    )
    nvidia_driver_install: bool = field(metadata=setting(boolean, "true or false"))
    nvidia_driver_version: str | None = field(
        metadata=setting(optional(driver_release), 'null or an NVIDIA driver release like "580.95.05"')
    )
    cuda: str = field(metadata=setting(choice(*CUDA_DRIVER_FLOOR), _one_of(*CUDA_DRIVER_FLOOR)))
    datasets_root: str = field(metadata=setting(absolute_path, "an absolute path"))
    datasets: tuple[Dataset, ...] = field(
        metadata=setting(
            datasets,
            "a mapping of dataset name to {source, readonly, prune, manifest, s3_endpoint, s3_credentials_file}",
        )
    )
    datasets_group: str = field(metadata=setting(username, "a group name like labdata"))
    # How many peers pull a host: dataset from this host at once; None: every puller at once.
    dataset_fanout: int | None = field(
        metadata=setting(optional(fanout), "null (no bound: every puller at once) or an integer 1-64")
    )
    # None means the inventory's ssh_hostname (or the host's name).
    lan_address: str = field(metadata=setting(optional(host_address), "null, an IP address or a DNS name"))
    # None means the inventory's ssh_port while lan_address is None, else 22.
    lan_ssh_port: int = field(metadata=setting(optional(port), "null or " + PORT))
    workspace_dir: str = field(metadata=setting(workspace_dir, 'an absolute path, optionally with "{user}"'))
    # Built from jupyter_users, jupyter_user (INPUT_ONLY), jupyter_port and workspace_dir.
    jupyter_users: tuple[JupyterUser, ...] = field(
        metadata=setting(
            list_of(jupyter_user_entry),
            "a list of user names or {name, port} mappings (each may add home_dir, env and secrets)",
        )
    )
    home_dir: str = field(metadata=setting(user_path, 'an absolute path, with "{user}" when there are several users'))
    jupyter_env: tuple[tuple[str, str], ...] = field(
        metadata=setting(environment, "a mapping of environment variable names to strings or numbers")
    )
    jupyter_secrets: tuple[tuple[str, str], ...] = field(
        metadata=setting(secret_files, "a mapping of environment variable names to files on the controller")
    )
    jupyter_port: int = field(metadata=setting(port, PORT))
    jupyter_bind: str = field(metadata=setting(ip_address, "an IPv4 or IPv6 address such as 127.0.0.1"))
    jupyter_update: str = field(metadata=setting(choice("when-idle", "now"), _one_of("when-idle", "now")))
    # Seconds; group_data/all.py writes it as a duration.
    jupyter_update_idle: int = field(metadata=setting(duration, 'a duration like "30m", "2h", "1h30m" or "90s"'))
    # Seconds, 0 for "off"; group_data/all.py writes a duration.
    jupyter_cull_idle: int = field(metadata=setting(cull_idle, '"off" or a duration like "30m", "12h" or "2d"'))
    jupyter_password_hash: str | None = field(
        metadata=setting(
            optional(argon2_hash), "null or an argon2 hash (argon2:$argon2id$v=19$m=...,t=...,p=...$salt$hash)"
        )
    )
    image_profile: str = field(metadata=setting(profile(profiles), "a profile under container/requirements"))
    image_delivery: str = field(
        metadata=setting(choice("build", "ship", "registry"), _one_of("build", "ship", "registry"))
    )
    image_registry: str | None = field(
        metadata=setting(optional(registry), "null or a registry address like registry.lab:5000")
    )
    registry_listen: str = field(metadata=setting(listen_address, 'an address and port like "0.0.0.0:5000"'))
    registry_storage: str = field(metadata=setting(absolute_path, "an absolute path"))
    base_image: str = field(metadata=setting(image_reference, "an image reference like ubuntu:24.04@sha256:<64 hex>"))
    extra_ca_certificates: tuple[str, ...] = field(
        metadata=setting(list_of(pem_file), "a list of PEM certificate files on the controller")
    )
    shm_size: str = field(metadata=setting(size, 'a size like "16g", "512m" or "1073741824"'))
    ulimits: dict = field(
        metadata=setting(ulimits, "a mapping of ulimit names (memlock, stack, nofile, ...) to integers, -1 = unlimited")
    )
    # The old PC this host takes each jupyter user's workspace and home from (labfleet.migrate).
    migrate_from: str | None = field(
        metadata=setting(optional(host_address), "null or the inventory name of the old PC, such as pc03.lab")
    )
    migrate_final: bool = field(metadata=setting(boolean, "true or false (true needs migrate_from)"))
    backup_repository: Repository | None = field(
        metadata=setting(optional(backup_repository), "null or a restic repository: " + REPOSITORY_FORMS)
    )
    backup_password_file: str | None = field(
        metadata=setting(optional(controller_file), "null or a file on the controller holding the restic password")
    )
    backup_ssh_key: str | None = field(
        metadata=setting(optional(controller_file), "null or an SSH private key file on the controller")
    )
    backup_schedule: Schedule = field(metadata=setting(backup_schedule, SCHEDULE_FORMS))
    backup_keep: tuple[tuple[str, int], ...] = field(
        metadata=setting(backup_keep, 'a mapping of counts such as {"daily": 7, "weekly": 4, "monthly": 6}')
    )
    restore_from: str | None = field(
        metadata=setting(optional(restore_from), 'null, "backup" or "backup:<host>" such as "backup:pc03.lab"')
    )
    groups: tuple[str, ...] = ()

    @property
    def is_registry(self) -> bool:
        """This host is the lab's registry (inventory group `registry`)."""
        return "registry" in self.groups

    @property
    def jupyter_user(self) -> JupyterUser:
        """The first (usually the only) jupyter user."""
        return self.jupyter_users[0]


# Keys of group_data/all.py that only feed other fields: jupyter_user names the one user
# when jupyter_users is empty (Settings.jupyter_user is that user, with port and workspace).
INPUT_ONLY: dict[str, Setting] = {
    "jupyter_user": Setting(optional(username), "null or a user name"),
}


def declarations() -> dict[str, Setting]:
    """Every setting of group_data/all.py: its key -> how it is checked."""
    declared = {f.name: f.metadata[SETTING] for f in dataclasses.fields(Settings) if SETTING in f.metadata}
    return {**declared, **INPUT_ONLY}
