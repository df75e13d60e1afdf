"""A GPG-signed apt repository, built and served inside a test host on its own loopback.

The repository has the layout of Docker's (``<mirror>/debian/dists/<codename>/stable``,
the key at ``<mirror>/debian/gpg``), so ``docker_apt_mirror = "http://127.0.0.1:<port>"``
points labfleet's docker-ce source at it. Its packages are the distribution's own
.debs, downloaded inside the host with everything they need that the host lacks. The
Packages index comes from ``dpkg-deb -f``; InRelease is clear-signed with a throwaway key.
``served_key="other"`` serves a different key than the one that signed the repository,
so apt's Signed-By check must fail.

The server runs inside the host (``systemd-run ... python3 -m http.server --bind 127.0.0.1``):
127.0.0.1 there is the host's own loopback, so no traffic leaves the test host.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .harness.hosts import TestHost, host_exec

REPO_ROOT = "/srv/labfleet-test-repo"
UNIT = "labfleet-test-repo"

_BUILD = r"""
set -eu
root={root}; codename={codename}; arch=$(dpkg --print-architecture)
repo=$root/debian; dists=$repo/dists/$codename; binary=$dists/stable/binary-$arch
rm -rf "$root"; mkdir -p "$repo/pool" "$binary" /var/cache/labfleet-test-debs/partial
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --download-only --no-install-recommends \
    -o Dir::Cache::archives=/var/cache/labfleet-test-debs {packages} >/dev/null
cp /var/cache/labfleet-test-debs/*.deb "$repo/pool/"
cd "$repo"
for deb in pool/*.deb; do
    dpkg-deb -f "$deb"
    echo "Filename: $deb"
    echo "Size: $(stat -c %s "$deb")"
    echo "SHA256: $(sha256sum "$deb" | cut -d' ' -f1)"
    echo
done > "$binary/Packages"
{{
    echo "Origin: labfleet-test"; echo "Label: labfleet-test"
    echo "Suite: $codename"; echo "Codename: $codename"
    echo "Date: $(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
    echo "Architectures: $arch"; echo "Components: stable"
    echo "SHA256:"
    index=stable/binary-$arch/Packages
    echo " $(sha256sum "$dists/$index" | cut -d' ' -f1) $(stat -c %s "$dists/$index") $index"
}} > "$dists/Release"
export GNUPGHOME=$(mktemp -d)
gpg --batch --quiet --passphrase '' --quick-gen-key 'labfleet test repository <signing@test>' default default never
gpg --batch --quiet --passphrase '' --quick-gen-key 'labfleet unrelated key <other@test>' default default never
gpg --batch --yes --quiet --local-user signing@test --clearsign -o "$dists/InRelease" "$dists/Release"
mkdir -p "$root/keys"
gpg --batch --yes --quiet --armor --export signing@test > "$root/keys/signing.asc"
gpg --batch --yes --quiet --armor --export other@test > "$root/keys/other.asc"
cp "$root/keys/{served}.asc" "$repo/gpg"
rm -rf "$GNUPGHOME"
ls pool | wc -l
"""


def build_signed_repo(
    host: TestHost, packages: Sequence[str], codename: str = "trixie", served_key: str = "signing"
) -> int:
    """Build the repository in host; returns how many .debs it holds."""
    if served_key not in ("signing", "other"):
        raise ValueError("served_key is 'signing' or 'other'")
    script = _BUILD.format(
        root=shlex.quote(REPO_ROOT),
        codename=shlex.quote(codename),
        packages=" ".join(shlex.quote(p) for p in packages),
        served=served_key,
    )
    result = host_exec(host, script, timeout=600)
    return int(result.stdout.strip().splitlines()[-1])


def serve_key(host: TestHost, which: str) -> None:
    """Serve the signing key ("signing") or an unrelated one ("other") at <mirror>/debian/gpg."""
    if which not in ("signing", "other"):
        raise ValueError("which is 'signing' or 'other'")
    host_exec(host, f"cp {REPO_ROOT}/keys/{which}.asc {REPO_ROOT}/debian/gpg", timeout=60)


def serve(host: TestHost, port: int = 8080) -> str:
    """Serve the repository on the host's 127.0.0.1:port; returns the docker_apt_mirror URL."""
    host_exec(
        host,
        f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; "
        f"systemd-run --unit {UNIT} python3 -m http.server --bind 127.0.0.1 --directory {REPO_ROOT} {port} && "
        f"for i in $(seq 50); do curl -fs -o /dev/null http://127.0.0.1:{port}/debian/gpg && exit 0; sleep 0.2; done; "
        "exit 1",
        timeout=60,
    )
    return f"http://127.0.0.1:{port}"
