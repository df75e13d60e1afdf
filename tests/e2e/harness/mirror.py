"""The Debian archive this controller already uses, read from its own apt sources.

The harness never names an archive host: debootstrap and the test hosts use whatever
mirror the controller is configured with.
"""

from __future__ import annotations

import glob
import os
import re

SOURCES_GLOB = "/etc/apt/sources.list.d/*.sources"
SOURCES_LIST = "/etc/apt/sources.list"
MIRROR_OVERRIDE_ENV = "LABFLEET_DEBIAN_MIRROR"


class NoMirror(Exception):
    """The controller's apt sources name no usable Debian archive."""


def debian_mirror() -> str:
    """The URL of the main Debian archive in the controller's apt sources.

    LABFLEET_DEBIAN_MIRROR overrides it. Security and non-http(s) sources are skipped.
    """
    override = os.environ.get(MIRROR_OVERRIDE_ENV)
    if override:
        return override.rstrip("/")
    for path in sorted(glob.glob(SOURCES_GLOB)):
        for uri in _deb822_uris(_read(path)):
            if _is_main_archive(uri):
                return uri.rstrip("/")
    for uri in _one_line_uris(_read(SOURCES_LIST)):
        if _is_main_archive(uri):
            return uri.rstrip("/")
    raise NoMirror(
        f"no Debian archive URL found in {SOURCES_GLOB} (URIs:) or {SOURCES_LIST}; set {MIRROR_OVERRIDE_ENV}"
    )


def _deb822_uris(text: str) -> list[str]:
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if any(suite.endswith("-security") for suite in fields.get("suites", "").split()):
            continue
        uris.extend(fields.get("uris", "").split())
    return uris


def _one_line_uris(text: str) -> list[str]:
    uris = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and not words[2].endswith("-security"):
            uris.append(words[1])
    return uris


def _is_main_archive(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and "security" not in uri


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""
