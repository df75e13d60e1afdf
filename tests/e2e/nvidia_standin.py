"""STAND-IN NVIDIA Container Toolkit packages in a GPG-signed, flat apt repository on a test host.

NVIDIA's toolkit is in no archive these machines reach, so the tests build packages under
the four real names (nvidia-container-toolkit, nvidia-container-toolkit-base,
libnvidia-container-tools, libnvidia-container1) with dpkg-deb, in three versions (OLD below
labfleet's security floor, FLOOR, and REFRESH, a 1.18 that ships nvidia-cdi-refresh), and
serve them with NVIDIA's layout:

    <root>/libnvidia-container/gpgkey                       the signing key
    <root>/libnvidia-container/stable/deb/<arch>/           flat: InRelease, Packages, *.deb

so ``nvidia_toolkit_apt_mirror = "http://127.0.0.1:<port>/libnvidia-container/stable/deb"``
exercises the same URL and key derivation as NVIDIA's own repository.

None of them touches a GPU. The runtime shim, nvidia-container-runtime, logs its
arguments and execs runc: that is what the real runtime does for a container that asks
for no GPU. nvidia-ctk writes a minimal CDI spec that names the driver version it read
from /proc/driver/nvidia/version and its own version, and logs each call.
nvidia-container-runtime-hook, which dockerd runs as a prestart hook for ``--gpus`` and
compose's GPU reservations, logs the NVIDIA_VISIBLE_DEVICES that dockerd set and, as the
real hook does through nvidia-container-cli, gives the container an nvidia-smi: a
stand-in that lists the requested devices. nvidia-container-cli exits 0. In REFRESH,
nvidia-cdi-refresh.path/.service stand in for the units toolkit 1.18 ships, and its
postinst enables and starts them as NVIDIA's does. Every file says STAND-IN.

The server runs inside the host (``systemd-run ... python3 -m http.server --bind 127.0.0.1``),
so no traffic leaves the test host.
"""

from __future__ import annotations

import shlex

from .harness.hosts import TestHost, host_exec

ROOT = "/srv/labfleet-nvidia-standin"
# Built packages wait here, and the signing key lives here, outside what the server serves.
POOL = "/srv/labfleet-nvidia-standin-pool"
UNIT = "labfleet-nvidia-standin-repo"
OLD, FLOOR, REFRESH = VERSIONS = ("1.17.7-1", "1.17.8-1", "1.18.0-1")
RUNTIME_LOG = "/var/log/nvidia-container-runtime-standin.log"
CTK_LOG = "/var/log/nvidia-ctk-standin.log"
HOOK_LOG = "/var/log/nvidia-container-runtime-hook-standin.log"

_RUNTIME = f"""#!/bin/sh
# STAND-IN for NVIDIA's nvidia-container-runtime (labfleet tests). A container that asks for
# no GPU is run by runc unchanged, which is what the real runtime does.
echo "$*" >> {RUNTIME_LOG}
exec runc "$@"
"""
_CTK = f"""#!/bin/sh
# STAND-IN for NVIDIA's nvidia-ctk (labfleet tests): only `cdi generate --output=PATH`.
echo "$*" >> {CTK_LOG}
case "$1 $2" in
"cdi generate") ;;
"--version "*) echo "NVIDIA Container Toolkit CLI version @VERSION@ (STAND-IN)"; exit 0;;
*) echo "nvidia-ctk STAND-IN: $* is not supported" >&2; exit 1;;
esac
out=${{NVIDIA_CTK_CDI_OUTPUT_FILE_PATH:-/etc/cdi/nvidia.yaml}}
for arg in "$@"; do case "$arg" in --output=*) out=${{arg#--output=}};; esac; done
driver=$(sed -n 's/^NVRM version:.*Module  *\\([0-9.]*\\).*/\\1/p' /proc/driver/nvidia/version 2>/dev/null)
[ -n "$driver" ] || {{ echo "nvidia-ctk STAND-IN: no NVIDIA driver loaded" >&2; exit 1; }}
mkdir -p "$(dirname "$out")"
cat > "$out" <<EOF
# STAND-IN CDI spec (labfleet tests): it describes no real device.
# driver: $driver
# toolkit: @VERSION@
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
  - name: all
    containerEdits:
      env: [NVIDIA_STANDIN_DRIVER=$driver]
containerEdits: {{}}
EOF
"""
_EXIT_0 = "#!/bin/sh\n# STAND-IN for NVIDIA's {name} (labfleet tests): does nothing.\nexit 0\n"
# Put into a container by the stand-in hook; @IDS@ becomes the device ids dockerd asked for.
_SMI = r"""#!/bin/sh
# STAND-IN nvidia-smi, put into this container by the stand-in hook (labfleet tests).
[ "$1" = -L ] || exit 0
for id in @IDS@; do
    case "$id" in GPU-*) uuid=$id;; *) uuid=GPU-00000000-0000-0000-0000-00000000000$id;; esac
    echo "GPU $id: NVIDIA STAND-IN (UUID: $uuid)"
done
"""
_HOOK = r"""#!/usr/bin/python3
# STAND-IN for NVIDIA's nvidia-container-runtime-hook (labfleet tests). dockerd runs it as a
# prestart hook for --gpus and compose's GPU reservations, with the OCI state on stdin. Like
# the real hook (through nvidia-container-cli), it gives the container an nvidia-smi, here a
# stand-in that lists the devices dockerd asked for in NVIDIA_VISIBLE_DEVICES; it logs them.
import json, os, sys

with open("@LOG@", "a") as log:
    if sys.argv[1:2] != ["prestart"]:
        log.write(" ".join(sys.argv[1:]) + "\n")
        sys.exit(0)
    state = json.load(sys.stdin)
    bundle = state.get("bundle") or os.getcwd()
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    env = dict(item.split("=", 1) for item in config["process"].get("env", []) if "=" in item)
    devices = env.get("NVIDIA_VISIBLE_DEVICES", "")
    root = os.path.join(bundle, config["root"]["path"])
    if devices and devices not in ("void", "none"):
        ids = ["0"] if devices == "all" else devices.split(",")
        smi = os.path.join(root, "usr/bin/nvidia-smi")
        os.makedirs(os.path.dirname(smi), exist_ok=True)
        with open(smi, "w") as f:
            f.write(@SMI@.replace("@" + "IDS@", " ".join(ids)))
        os.chmod(smi, 0o755)
    log.write(f"prestart {state.get('id', '')} NVIDIA_VISIBLE_DEVICES={devices}\n")
""".replace("@LOG@", HOOK_LOG).replace("@SMI@", repr(_SMI))
# As NVIDIA's units (deployments/systemd/ of NVIDIA/nvidia-container-toolkit): the path unit
# starts the service when the kernel's modules or nvidia-ctk change; the oneshot service
# writes /var/run/cdi/nvidia.yaml. A simulated driver (simulate_driver) stands in for the
# real service's conditions (nvidia-smi present, nvidia.ko in modules.dep).
_REFRESH_PATH = """[Unit]
Description=STAND-IN (labfleet tests) for NVIDIA's CDI refresh trigger

[Path]
PathChanged=/run/labfleet-standin-driver-changed
PathChanged=/usr/bin/nvidia-ctk

[Install]
WantedBy=multi-user.target
"""
_REFRESH_SERVICE = """[Unit]
Description=STAND-IN (labfleet tests) for NVIDIA's CDI refresh
ConditionPathExists=/proc/driver/nvidia/version

[Service]
Type=oneshot
Environment=NVIDIA_CTK_CDI_OUTPUT_FILE_PATH=/var/run/cdi/nvidia.yaml
ExecStart=/usr/bin/nvidia-ctk cdi generate
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""
_POSTINST = "#!/bin/sh\n# As dh_installsystemd's snippet does: make the new units known.\n"
_POSTINST += "[ -d /run/systemd/system ] && systemctl daemon-reload || true\n"
# As NVIDIA's nvidia-container-toolkit-base.postinst from 1.18 (NVIDIA/nvidia-container-toolkit#1229).
_POSTINST_REFRESH = _POSTINST + (
    "[ -d /run/systemd/system ] || exit 0\n"
    "systemctl enable --now nvidia-cdi-refresh.path || true\n"
    "systemctl enable --now nvidia-cdi-refresh.service || true\n"
    "systemctl start nvidia-cdi-refresh.service || true\n"
)

# package: (depends, {path: (mode, content)}); REFRESH adds _REFRESH_FILES to the base package.
_PACKAGES = {
    "libnvidia-container1": ("", {"/usr/share/doc/libnvidia-container1/STAND-IN": ("644", "labfleet tests\n")}),
    "libnvidia-container-tools": (
        "libnvidia-container1 (= @VERSION@)",
        {"/usr/bin/nvidia-container-cli": ("755", _EXIT_0.format(name="nvidia-container-cli"))},
    ),
    "nvidia-container-toolkit-base": (
        "",
        {
            "/usr/bin/nvidia-container-runtime": ("755", _RUNTIME),
            "/usr/bin/nvidia-ctk": ("755", _CTK),
            "DEBIAN/postinst": ("755", _POSTINST),
        },
    ),
    "nvidia-container-toolkit": (
        "nvidia-container-toolkit-base (= @VERSION@), libnvidia-container-tools (>= @VERSION@)",
        {"/usr/bin/nvidia-container-runtime-hook": ("755", _HOOK)},
    ),
}
_REFRESH_FILES = {
    "/usr/lib/systemd/system/nvidia-cdi-refresh.path": ("644", _REFRESH_PATH),
    "/usr/lib/systemd/system/nvidia-cdi-refresh.service": ("644", _REFRESH_SERVICE),
    "DEBIAN/postinst": ("755", _POSTINST_REFRESH),
}

_INDEX_AND_SIGN = r"""
set -eu
lib={root}/libnvidia-container; arch=$(dpkg --print-architecture); repo=$lib/stable/deb/$arch
mkdir -p "$repo"; rm -f "$repo"/*.deb
for version in {versions}; do cp {pool}/*_"$version"_"$arch".deb "$repo"/; done
cd "$repo"
for deb in *.deb; do
    dpkg-deb -f "$deb"
    echo "Filename: ./$deb"
    echo "Size: $(stat -c %s "$deb")"
    echo "SHA256: $(sha256sum "$deb" | cut -d' ' -f1)"
    echo
done > Packages
{{
    echo "Origin: labfleet-test STAND-IN"; echo "Label: libnvidia-container STAND-IN"
    echo "Date: $(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
    echo "Architectures: $arch"
    echo "SHA256:"
    echo " $(sha256sum Packages | cut -d' ' -f1) $(stat -c %s Packages) Packages"
}} > Release
export GNUPGHOME={pool}/gnupg
if [ ! -d "$GNUPGHOME" ]; then
    mkdir -m 700 "$GNUPGHOME"
    gpg --batch --quiet --passphrase '' --quick-gen-key 'labfleet STAND-IN <standin@test>' default default never
fi
gpg --batch --yes --quiet --local-user standin@test --clearsign -o InRelease Release
gpg --batch --yes --quiet --armor --export standin@test > "$lib/gpgkey"
ls *.deb | wc -l
"""


def _package_script(name: str, version: str, depends: str, contents: dict) -> str:
    """Shell that builds one stand-in .deb into the repository directory."""
    build = f"$tmp/{name}_{version}"
    lines = [f"mkdir -p {build}/DEBIAN"]
    for path, (mode, text) in contents.items():
        target = f"{build}/{path.lstrip('/')}"
        lines.append(f"mkdir -p $(dirname {target})")
        lines.append(f"printf '%s' {shlex.quote(text.replace('@VERSION@', version))} > {target}")
        lines.append(f"chmod {mode} {target}")
    control = (
        f"Package: {name}\nVersion: {version}\nArchitecture: $arch\n"
        "Maintainer: labfleet tests <standin@test>\n"
        + (f"Depends: {depends.replace('@VERSION@', version)}\n" if depends else "")
        + f"Description: STAND-IN for NVIDIA's {name} (labfleet tests; no GPU support)\n"
    )
    lines.append(f'printf "%s" "{control}" > {build}/DEBIAN/control')
    lines.append(f'dpkg-deb --root-owner-group --build {build} "$repo/{name}_{version}_$arch.deb" >/dev/null')
    return "\n".join(lines)


def build_standin_repo(host: TestHost, versions: tuple[str, ...] = VERSIONS) -> int:
    """Build the packages of every version in host, and publish versions; returns how many .debs it serves."""
    script = [
        "set -eu",
        f"rm -rf {ROOT} {POOL}; arch=$(dpkg --print-architecture)",
        f"repo={POOL}; mkdir -p $repo; tmp=$(mktemp -d)",
    ]
    for version in VERSIONS:
        for name, (depends, contents) in _PACKAGES.items():
            if version == REFRESH and name == "nvidia-container-toolkit-base":
                contents = {**contents, **_REFRESH_FILES}
            script.append(_package_script(name, version, depends, contents))
    script.append('rm -rf "$tmp"')
    host_exec(host, "\n".join(script), timeout=300)
    return publish(host, versions)


def publish(host: TestHost, versions: tuple[str, ...]) -> int:
    """Serve exactly these versions (a new release appearing upstream), signed with the same key;
    returns how many .debs the repository holds."""
    script = _INDEX_AND_SIGN.format(root=shlex.quote(ROOT), pool=shlex.quote(POOL), versions=" ".join(versions))
    result = host_exec(host, script, timeout=300)
    return int(result.stdout.strip().splitlines()[-1])


def serve(host: TestHost, port: int = 8081) -> str:
    """Serve the repository on the host's 127.0.0.1:port; returns nvidia_toolkit_apt_mirror."""
    host_exec(
        host,
        f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; "
        f"systemd-run --unit {UNIT} python3 -m http.server --bind 127.0.0.1 --directory {ROOT} {port} && "
        f"for i in $(seq 50); do curl -fs -o /dev/null http://127.0.0.1:{port}/libnvidia-container/gpgkey && exit 0; "
        "sleep 0.2; done; exit 1",
        timeout=60,
    )
    return f"http://127.0.0.1:{port}/libnvidia-container/stable/deb"


def simulate_driver(host: TestHost, version: str | None) -> None:
    """Make /proc/driver/nvidia say that driver version is loaded with one GPU (None: no driver).

    A tmpfs over /proc/driver inside the test host, read by labfleet's GpuHost fact and by
    the stand-in nvidia-ctk. No kernel module is involved; only the text a driver exposes.
    """
    if version is None:
        host_exec(host, "umount /proc/driver 2>/dev/null; true")
        return
    line = f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Wed Jan 22 18:25:35 UTC 2025"
    host_exec(
        host,
        "mountpoint -q /proc/driver || mount -t tmpfs -o size=1m labfleet-standin-driver /proc/driver; "
        "mkdir -p /proc/driver/nvidia/gpus/0000:01:00.0 && "
        f"echo {shlex.quote(line)} > /proc/driver/nvidia/version",
    )
