"""Validators for single setting values.

Each validator returns the normalised value or raises Invalid with a short detail; the
caller adds the host, the key, the value and the expected form to the message.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse


class Invalid(ValueError):
    """A value does not have the expected form."""


_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PACKAGE_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_PACKAGE_SPEC = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[0-9][A-Za-z0-9.+~:-]*)?$")
_DRIVER_VERSION = re.compile(r"^\d{3}(\.\d{1,3}){0,2}$")
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


def driver_version(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _DRIVER_VERSION.match(value):
        raise Invalid("")
    return value


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


def _dataset_source(source):
    _string(source)
    kind, _, rest = source.partition(":")
    if source == "manual":
        return source
    if kind == "local" and rest:
        # Checked here, on the controller, so that a typo stops the run before any host is touched.
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise Invalid(f"local source {rest!r} is not a directory on the controller")
        return f"local:{path.resolve()}"
    if kind == "host":
        peer, _, path = rest.partition(":")
        if peer and path.startswith("/"):
            return source
    if kind == "nfs":
        server, _, export = rest.partition(":")
        if server and export.startswith("/"):
            return source
    raise Invalid(
        f"source {source!r} must be manual, local:<path>, host:<inventory host>:</path> or nfs:<server>:</export>"
    )


def datasets(value):
    from labfleet.settings import Dataset

    if not isinstance(value, dict):
        raise Invalid("not a mapping")
    out = []
    for name, spec in value.items():
        dataset_name(name)
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict):
            raise Invalid(f"dataset {name!r} must be a mapping with a source")
        unknown = set(spec) - {"source", "readonly", "prune", "manifest"}
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
        source = _dataset_source(spec["source"])
        if source.startswith("nfs:") and not readonly:
            raise Invalid(f"dataset {name!r}: an nfs: source is mounted read-only; remove readonly: false")
        out.append(Dataset(name, source, readonly, prune, manifest))
    return tuple(out)


def jupyter_user_entry(value):
    if isinstance(value, str):
        return username(value)
    if isinstance(value, dict) and set(value) <= {"name", "port"} and "name" in value:
        name = username(value["name"])
        return (name, port(value["port"])) if "port" in value else name
    raise Invalid("expected a user name or {name, port}")


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


def listen_address(value):
    _string(value)
    address, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Invalid("")
    if address not in ("", "0.0.0.0", "[::]"):
        ip_address(address.strip("[]"))
    return value
