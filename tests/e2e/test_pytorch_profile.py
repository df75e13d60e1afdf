"""The default profile, `pytorch` (CUDA 12.8), built, smoke-tested and brought up by a real deploy.

Every other image test uses the small `jupyter` profile; this module is the one that builds
what a lab gets by default (about 8.4 GB, torch with the CUDA 12.8 wheels) on the harness's
Debian 13 base, through labfleet.image.build_image and the test wheel cache (the lock's wheels
are fetched once per machine), under the deploy's own tag: the deploy then finds it on the
controller and ships it to the test host as a lab's first deploy would.

There is no GPU here and no NVIDIA toolkit on the test host (gpu = False): torch's CUDA path is
checked only in that the image reports no GPU cleanly and computes on the CPU. No stand-in is
used; the image and the deploy are the real ones.

One host, and the deploy, its checks and the second run in one test: the suite runs on three
pytest-xdist workers that may split a module's tests among them, and a second worker would start
a second host and ship the 8 GB again. Marked long: collected first, so that its minutes overlap
the rest of the suite (tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from labfleet import image
from labfleet.model import lock_file

from .harness import images, wheels
from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes, controller_ca_certificates, run_pyinfra
from .probes import api_status, env_tag, health, image_id

pytestmark = pytest.mark.long

PROFILE, CUDA = "pytorch", "12.8"
REQUIREMENTS_DIR = image.CONTEXT_DIR / "requirements"
CONTAINER = "labfleet-lab-jupyterlab-1"
BUILD_TIMEOUT_S = 3600  # cold: about 3 GB of wheels installed in 20 layers on two cores
DEPLOY_TIMEOUT_S = 2400  # cold: the 8 GB image saved, copied over SSH and loaded
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A distribution that says it is a JupyterLab extension must bring at least one.
EXTENSION_CLASSIFIER = "Framework :: Jupyter :: JupyterLab :: Extensions"

# Run by the image's Python with the lock's text on stdin: every pin whose marker holds for this
# Python is installed at the locked version, so the lock was resolved for the base's Python and
# none of its lines was skipped or replaced.
_LOCK_COVERAGE = r"""
import importlib.metadata, json, re, sys
from packaging.requirements import Requirement
missing, checked = [], 0
for line in re.sub(r"\\\n", " ", sys.stdin.read()).splitlines():
    line = line.split("#", 1)[0].split(" --hash", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    requirement = Requirement(line)
    if requirement.marker and not requirement.marker.evaluate():
        continue
    checked += 1
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or installed not in requirement.specifier:
        missing.append(f"{line} (installed: {installed})")
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "checked": checked, "missing": missing}))
"""

# Run by the image's Python with the profile's top-level requirements as arguments: for each, the
# JupyterLab extensions (share/jupyter/labextensions/<name>/package.json) and the server
# extensions (etc/jupyter/jupyter_server_config.d/*.json) that it and its dependencies install,
# and whether it calls itself a JupyterLab extension.
_EXTENSIONS_SHIPPED = r"""
import importlib.metadata, json, re, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
LAB = re.compile(r"share/jupyter/labextensions/((?:@[^/]+/)?[^/@]+)/package\.json$")
SERVER = re.compile(r"etc/jupyter/jupyter_server_config\.d/[^/]+\.json$")
CLASSIFIER = sys.argv[1]

def closure(requirement):
    seen, todo, found = set(), [(requirement.name, frozenset(requirement.extras))], []
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        dist = importlib.metadata.distribution(name)
        found.append(dist)
        for line in dist.requires or []:
            wanted = Requirement(line)
            if wanted.marker and not any(wanted.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            todo.append((wanted.name, frozenset(wanted.extras)))
    return found

report = {}
for line in sys.argv[2:]:
    requirement = Requirement(line)
    top = importlib.metadata.distribution(requirement.name)
    lab, server = set(), set()
    for dist in closure(requirement):
        for path in dist.files or []:
            if LAB.search(str(path)):
                lab.add(json.loads(path.read_text())["name"])
            elif SERVER.search(str(path)):
                enabled = json.loads(path.read_text()).get("ServerApp", {}).get("jpserver_extensions", {})
                server.update(name for name, on in enabled.items() if on)
    report[canonicalize_name(requirement.name)] = {
        "extension": CLASSIFIER in (top.metadata.get_all("Classifier") or []),
        "lab": sorted(lab),
        "server": sorted(server),
    }
print(json.dumps(report))
"""


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a .in file, following its -r includes (comments and options dropped)."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            lines += requirement_lines(path.parent / line.split(None, 1)[1])
        elif line and not line.startswith("-"):
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def pytorch_image(base_image, wheel_cache):
    """The pytorch profile built on the Debian 13 test base, under the tag a deploy computes.

    Kept afterwards, as the jupyter profile's image is: it is the engine's layer cache that
    makes the next run's build a matter of seconds.
    """
    base = base_image("trixie")
    lock = lock_file(PROFILE, CUDA)
    assert lock is not None, f"no lock for {PROFILE} on CUDA {CUDA}"
    # The session's wheel cache serves one directory; this adds the lock's wheels to it.
    wheels.fill([lock], base)
    settings = image.controller_settings(
        image_profile=PROFILE, cuda=CUDA, base_image=base, extra_ca_certificates=controller_ca_certificates()
    )
    tag = image.image_tag(settings)
    with images.image_lock(tag):
        build = image.build_image(settings, wheels=wheel_cache, timeout=BUILD_TIMEOUT_S)
    return build, lock


def test_the_lock_covers_the_base_python_and_the_smoke_test_passes(pytorch_image, base_image):
    build, lock = pytorch_image
    assert build.tag.startswith(f"{image.REPOSITORY}:{PROFILE}-")
    base_python = wheels.image_platform(base_image("trixie"))["python"]

    # The build ran `pip check` over the whole stack; run it again on what the tag names.
    checked = docker("run", "--rm", "--entrypoint", "pip", build.tag, "check", check=False, timeout=300)
    assert checked.returncode == 0 and "No broken requirements found" in checked.stdout, checked.stdout + checked.stderr
    covered = docker(
        "run", "--rm", "-i", "--entrypoint", "python3", build.tag, "-c", _LOCK_COVERAGE,
        input=lock.read_text(), timeout=300,
    )  # fmt: skip
    coverage = json.loads(covered.stdout)
    assert coverage["python"] == base_python, f"the image's Python is not the base's {base_python}: {coverage}"
    assert coverage["missing"] == [], f"{lock.name} pins not installed on Python {base_python}: {coverage['missing']}"
    assert coverage["checked"] > 100, coverage  # the whole lock was read, not a stray line of it

    smoke = docker(
        "run", "--rm", "--entrypoint", "python3", build.tag, "/opt/labfleet/smoke_test.py",
        check=False, timeout=600,
    )  # fmt: skip
    output = smoke.stdout + smoke.stderr
    assert smoke.returncode == 0, output
    assert f"profile {PROFILE}, Python {base_python}." in output
    for module in ("torch", "torchvision", "torchaudio"):
        assert re.search(rf"^ok   {module} \d+\.\d+\.\d+\+cu128$", smoke.stdout, re.M), f"{module}:\n{output}"
    cuda = CUDA.replace(".", r"\.")
    assert re.search(rf"^torch \S+\+cu128, built for CUDA {cuda}$", smoke.stdout, re.M), output
    # No GPU here: said plainly, no error, and the matmul done on the CPU.
    assert "CUDA available: False, devices: 0" in smoke.stdout, output
    assert re.search(r"^matmul 512x512 on cpu: max abs error \S+ ok$", smoke.stdout, re.M), output
    assert smoke.stdout.rstrip().endswith("smoke test passed"), output
    assert not re.search(r"Traceback|Error|FAIL", smoke.stderr), smoke.stderr


@pytest.fixture(scope="module")
def pytorch_host(fleet):
    (host,) = fleet.start_hosts(1, engine=True)
    yield host
    fleet.remove([host])  # with its engine's volume: the image's 8 GB on the host go with it


def test_the_default_profile_comes_up_healthy_with_every_extension(pytorch_image, pytorch_host, base_image):
    build, _ = pytorch_image
    host = pytorch_host
    data = {
        "docker_source": "distro",
        "image_profile": PROFILE,
        "cuda": CUDA,
        "image_delivery": "ship",
        "base_image": base_image("trixie"),
        "gpu": False,
    }
    first = run_pyinfra([host], data=data, timeout=DEPLOY_TIMEOUT_S)
    assert_converged(first)
    # The deploy computed the tag that was built, found it, and shipped it: nothing rebuilt.
    assert env_tag(host) == build.tag
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", build.tag).stdout.strip()
    assert image_id(host, build.tag) == controller_id
    assert first.status(host, f"Load {build.tag}") == "success"
    assert health(host) == "healthy"
    token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout.strip()
    assert api_status(host) == "403" and api_status(host, token=token) == "200"
    assert host_exec(host, f"docker exec {CONTAINER} printenv LABFLEET_PROFILE").stdout.strip() == PROFILE

    # What the profile's requirements bring, read from the installed distributions' own files.
    lines = requirement_lines(REQUIREMENTS_DIR / f"{PROFILE}.in")
    shipped = json.loads(
        host_exec(
            host,
            f"docker exec -i {CONTAINER} python3 - {shlex.quote(EXTENSION_CLASSIFIER)} "
            + " ".join(shlex.quote(line) for line in lines),
            input=_EXTENSIONS_SHIPPED,
        ).stdout
    )
    assert len(shipped) == len(lines), shipped
    claimed = [name for name, found in shipped.items() if found["extension"]]
    assert claimed, f"no requirement of {PROFILE}.in is a JupyterLab extension: {shipped}"
    assert [name for name in claimed if not shipped[name]["lab"]] == [], shipped
    lab = sorted({name for found in shipped.values() for name in found["lab"]})
    server = sorted({name for found in shipped.values() for name in found["server"]})

    listed = host_exec(host, f"docker exec -u lab {CONTAINER} jupyter labextension list 2>&1").stdout
    listed = ANSI.sub("", listed)
    rows = {line.split()[0]: line.strip() for line in listed.splitlines() if re.match(r"\s+\S+ v\d", line)}
    for name in lab:
        assert name in rows and " enabled OK" in rows[name], f"lab extension {name} not enabled and OK:\n{listed}"
    disabled = listed.partition("Disabled extensions:")[2].split()
    assert [plugin for plugin in disabled if plugin.split(":")[0] in lab] == [], listed

    servers = ANSI.sub("", host_exec(host, f"docker exec -u lab {CONTAINER} jupyter server extension list 2>&1").stdout)
    for name in server:
        assert re.search(rf"^\s+{re.escape(name)} enabled$", servers, re.M), f"{name} not enabled:\n{servers}"
        assert re.search(rf"^\s+{re.escape(name)} \S* ?OK$", servers, re.M), f"{name} not valid:\n{servers}"

    # And the running server: it loaded every server extension, and the page it serves to the
    # browser lists every lab extension to load.
    logs = host_exec(host, f"docker logs {CONTAINER} 2>&1").stdout
    for name in server:
        assert f"{name} | extension was successfully loaded" in logs, f"{name} not loaded:\n{logs[-3000:]}"
    page = host_exec(host, f"curl -sf -H 'Authorization: token {token}' http://127.0.0.1:8888/lab", timeout=120).stdout
    match = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    assert match, page[:2000]
    config = json.loads(match.group(1))
    served = {extension["name"] for extension in config.get("federated_extensions", [])}
    assert set(lab) <= served, f"the server does not offer {sorted(set(lab) - served)}"

    # torch under the deploy's own runtime: the user's UID, no new privileges, no GPU.
    smoke = host_exec(host, f"docker exec -u lab {CONTAINER} python3 /opt/labfleet/smoke_test.py").stdout
    assert "CUDA available: False" in smoke and smoke.rstrip().endswith("smoke test passed"), smoke

    assert_no_changes(run_pyinfra([host], data=data, timeout=DEPLOY_TIMEOUT_S))
