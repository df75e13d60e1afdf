"""The host's side of a filled load, run here against a stand-in `docker` (no engine needed)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from labfleet import shipping
from labfleet.facts.image import HostEngineLayers, parse_engine_layers

IMAGE_ID = "sha256:" + "1" * 64
SENT, KEPT = "sha256:" + "a" * 64, "sha256:" + "b" * 64

# `docker save` prints the file named by $SAVED; `docker load` keeps its stdin in $LOADED;
# `docker image inspect` names $IMAGE_ID.
STAND_IN_DOCKER = """#!/bin/sh
case "$1" in
  save) cat "$SAVED";;
  load) cat >"$LOADED";;
  image) echo "$IMAGE_ID";;
esac
"""


def _tar(path: Path, files: dict[str, bytes], compress: bool) -> None:
    opened = gzip.open(path, "wb") if compress else open(path, "wb")  # noqa: SIM115
    with opened as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _run(tmp_path: Path, saved: dict[str, bytes]) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(STAND_IN_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    archive = tmp_path / "labfleet-x.tar.gz"
    manifest = [{"Config": "c.json", "Layers": ["v1a/layer.tar", "v1b/layer.tar", "v1c/layer.tar"]}]
    _tar(archive, {"manifest.json": json.dumps(manifest).encode(), "c.json": b"{}", "v1a/layer.tar": b"A"}, True)
    _tar(tmp_path / "saved.tar", saved, False)
    script = shipping.fill_and_load_script(
        str(archive),
        "lab:1",
        IMAGE_ID,
        [("sha256:old", {KEPT: ("v1b/layer.tar", "v1c/layer.tar")})],
        "gzip",
        marker=str(tmp_path / "state" / "fill-failed"),
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SAVED": str(tmp_path / "saved.tar"),
        "LOADED": str(tmp_path / "loaded.tar"),
        "IMAGE_ID": IMAGE_ID,
    }
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True), archive


def test_the_host_fills_in_its_own_layers_under_the_archives_names_and_loads_the_whole(tmp_path):
    saved = {f"blobs/sha256/{KEPT[7:]}": b"B" * 700, f"blobs/sha256/{'c' * 64}": b"other", "index.json": b"{}"}
    done, archive = _run(tmp_path, saved)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "loaded.tar") as tar:
        loaded = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile() or m.islnk()}
        assert tar.extractfile(loaded["v1a/layer.tar"]).read() == b"A"
        assert tar.extractfile(loaded["v1b/layer.tar"]).read() == b"B" * 700
        assert set(loaded) == {"manifest.json", "c.json", "v1a/layer.tar", "v1b/layer.tar", "v1c/layer.tar"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "loaded.tar", "saved.tar"], "left behind"
    assert not archive.exists()


def test_a_fill_that_finds_no_layer_fails_loads_nothing_and_is_marked_for_the_next_deploy(tmp_path):
    done, _ = _run(tmp_path, {"index.json": b"{}"})
    assert done.returncode == 1
    assert "could not be copied from its own images; the next deploy sends them" in done.stderr
    assert (tmp_path / "state" / "fill-failed").exists()
    assert not (tmp_path / "loaded.tar").exists(), "a load ran after a failed fill"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "saved.tar", "state"], "left behind"


def test_the_progress_answer_names_the_phase():
    answer = shipping.fill_answer(1000)
    reading = answer("fill\n400\n")
    assert (reading.done, reading.total) == (400, 1000) and "own images" in reading.detail
    assert answer("").done is None


def _stand_in(tmp_path: Path, load: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(STAND_IN_DOCKER.replace('load) cat >"$LOADED";;', f"load) {load};;"))
    (bin_dir / "docker").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOADED": str(tmp_path / "loaded")}


def test_a_load_removes_the_archive_before_the_engine_unpacks_it(tmp_path):
    # The engine unpacks the whole archive before it registers the layers: by then the host
    # must no longer hold the archive too.
    archive = tmp_path / "labfleet-x.tar.gz"
    archive.write_bytes(gzip.compress(b"the image"))
    env = _stand_in(tmp_path, f'cat >"$LOADED"; ls {archive} >"$LOADED.seen" 2>&1; true')
    env["IMAGE_ID"] = IMAGE_ID
    command = shipping.load_command(str(archive), "lab:1", IMAGE_ID, "gzip")
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert gzip.decompress((tmp_path / "loaded").read_bytes()) == b"the image", "the engine reads gzip itself"
    assert "No such file" in (tmp_path / "loaded.seen").read_text(), "the archive was still there during the load"
    assert not archive.exists() and not Path(f"{archive}.pid").exists()


def test_a_load_that_gives_another_image_fails_and_says_so(tmp_path):
    archive = tmp_path / "labfleet-x.tar.zst"
    archive.write_bytes(b"not zstd")
    env = _stand_in(tmp_path, 'cat >"$LOADED"')
    env["IMAGE_ID"] = "sha256:other"
    done = subprocess.run(
        ["sh", "-c", shipping.load_command(str(archive), "lab:1", IMAGE_ID, "zstd")], env=env, capture_output=True
    )
    assert done.returncode == 1 and b"loading lab:1 did not give image" in done.stderr
    assert not archive.exists()


def test_the_engine_fact_survives_an_image_removed_while_it_reads(tmp_path):
    """A stand-in docker whose listing names an image that is gone by the time it is inspected."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        "  info*) echo '26.1.5 []';;\n"
        f"  'image ls') printf '%s\\n' {KEPT} {SENT};;\n"
        f"  'image inspect') echo '{KEPT} 12 [\"{SENT}\"]'; echo 'Error: No such image: {SENT}' >&2; exit 1;;\n"
        "esac\n"
    )
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", HostEngineLayers().command()], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    engine = parse_engine_layers(result.stdout.splitlines())
    assert engine["version"] == "26.1.5"
    assert engine["images"] == [{"id": KEPT, "size": 12, "layers": [SENT]}]
