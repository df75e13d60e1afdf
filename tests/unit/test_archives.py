"""Archives without the layers a host has: chain ids, which layers to leave out, the written archive."""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import logging
import os
import tarfile

import pytest

from labfleet import archive_cache, archives
from labfleet.facts.image import EngineLayers, parse_engine_layers

# An image's diff ids and the chain ids Docker 20.10 keeps for them in its layer database
# (image/overlay2/layerdb/sha256/<chain id>), read off a real engine.
DIFF_IDS = [
    "sha256:dc5b0d9277fd7a576108eda82508cbdc445734ea8f5b880bbe7f6539fa3b0faa",
    "sha256:a4f08a75117f7bb393a430580865e99cc1b29c8085ce97c89f56efbc21f842d6",
    "sha256:872933f87e5f690b61e26b49ae4a3a00522ce68c2a24ab492195dbed0a44011c",
]
ENGINE_CHAIN_IDS = [
    "sha256:dc5b0d9277fd7a576108eda82508cbdc445734ea8f5b880bbe7f6539fa3b0faa",
    "sha256:195edaeadad051dbfe46ba5695127ceb862a0176db34572fc6569ac63561ac5f",
    "sha256:09e6055ab8a900564eec86b80c3917e04cc46ef0f373b9be2dcca39b3dca240d",
]


def test_chain_ids_are_the_engines():
    assert archives.chain_ids(DIFF_IDS) == ENGINE_CHAIN_IDS


def test_a_layer_counts_as_present_only_on_top_of_the_same_layers():
    archive = archives.Archive("x:1", "sha256:x", None, 0, tuple(DIFF_IDS))
    assert archives.layers_present(archive, set(ENGINE_CHAIN_IDS[:2])) == 2
    assert archives.layers_present(archive, None) == 0
    assert archives.layers_present(archive, set()) == 0
    # The same second layer on another first layer is another chain: nothing is reusable.
    other = archives.chain_ids(["sha256:" + "0" * 64, DIFF_IDS[1]])
    assert archives.layers_present(archive, set(other)) == 0
    # A gap ends the run: layers above a missing one are not reusable either.
    assert archives.layers_present(archive, {ENGINE_CHAIN_IDS[0], ENGINE_CHAIN_IDS[2]}) == 1


def _engine(*images: list[str], version: str = "26.1.5+dfsg1", sizes: list[int] | None = None) -> EngineLayers:
    return {
        "store": "classic",
        "version": version,
        "fill_failed": False,
        "images": [
            {"id": f"sha256:img{n}", "size": (sizes or [1000] * len(images))[n], "layers": list(layers)}
            for n, layers in enumerate(images)
        ],
    }


def test_the_fact_gives_every_images_layers_the_engine_and_its_store():
    lines = [
        "version 26.1.5+dfsg1",
        f"sha256:aaa 123 {json.dumps(DIFF_IDS[:1])}",
        f"sha256:bbb 456 {json.dumps(DIFF_IDS)}",
    ]
    engine = parse_engine_layers(lines)
    assert engine["store"] == "classic" and engine["version"] == "26.1.5+dfsg1" and not engine["fill_failed"]
    assert engine["images"][1] == {"id": "sha256:bbb", "size": 456, "layers": DIFF_IDS}
    assert archives.host_chains(engine) == set(ENGINE_CHAIN_IDS)
    assert archives.host_chains(parse_engine_layers(["version 26.1", "containerd"])) is None
    assert parse_engine_layers(["version 26.1", "fill-failed"])["fill_failed"]


D = [f"sha256:{n}" * 1 for n in "abcdefgh"]  # an image of eight layers, bottom first


def test_a_bump_in_a_middle_layer_sends_that_layer_and_fills_the_ones_above_from_the_host():
    old = D[:8]
    new = (*D[:3], "sha256:new", *D[4:])  # slice 4 bumped: 5..8 keep their diff ids, not their chains
    plan = archives.plan_layers(new, _engine(old))
    assert plan.skip == 3
    assert plan.send == (3,)
    assert plan.fills == (archives.Fill("sha256:img0", tuple(sorted(D[4:]))),)
    # The chains alone (an engine before Docker 25, or a failed fill) would send 4..8.
    assert archives.plan_layers(new, _engine(old, version="24.0.7")).send == (3, 4, 5, 6, 7)
    failed = {**_engine(old), "fill_failed": True}
    assert archives.plan_layers(new, failed) == archives.LayerPlan(3, (3, 4, 5, 6, 7))  # type: ignore[arg-type]


def test_the_whole_image_where_the_host_cannot_tell_or_holds_nothing():
    assert archives.plan_layers(tuple(D), None).whole
    assert archives.plan_layers(tuple(D), {**_engine(D), "store": "containerd"}).whole  # type: ignore[arg-type]
    plan = archives.plan_layers(tuple(D), _engine())
    assert plan.whole and plan.send == tuple(range(8))


def test_filled_layers_come_from_as_few_images_as_hold_them():
    new = ("sha256:x", *D[1:])
    small, large = D[:4], D  # the larger image holds every layer: one save is enough
    plan = archives.plan_layers(new, _engine(small, large, sizes=[10, 20]))
    assert plan.send == (0,) and [fill.image for fill in plan.fills] == ["sha256:img1"]
    # Two images that each hold half: both are saved, the one holding more first.
    plan = archives.plan_layers(new, _engine(D[1:3], D[3:], sizes=[10, 20]))
    assert [fill.image for fill in plan.fills] == ["sha256:img1", "sha256:img0"]
    assert sorted(d for fill in plan.fills for d in fill.diff_ids) == sorted(D[1:])


def test_layers_too_small_to_be_worth_a_save_of_the_hosts_image_travel():
    new = (*D[:6], "sha256:new", D[7])
    sizes = (100, 100, 100, 100, 100, 100, 5, 5)
    # Only layer 8 is above the bump: 5 bytes are not worth saving a 1000-byte image.
    plan = archives.plan_layers(new, _engine(D, sizes=[1000]), sizes)
    assert plan.send == (6, 7) and plan.fills == ()
    assert archives.plan_layers(new, _engine(D, sizes=[40]), sizes).fills != ()


def _saved(path, layers: dict[str, bytes], links: dict[str, str] | None = None, oci: bool = False):
    """A small `docker save`-shaped archive: one file or directory per layer and manifest.json."""
    names = [f"blobs/sha256/{name}" if oci else f"{name}/layer.tar" for name in layers]
    with gzip.open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, data in zip(names, layers.values(), strict=True):
            if not oci:
                add(name.replace("layer.tar", "VERSION"), b"1.0")
            add(name, data)
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(f"{name}/layer.tar")
            info.type, info.linkname = tarfile.SYMTYPE, f"../{target}/layer.tar"
            tar.addfile(info)
            names.append(info.name)
        add("config.json", b"{}")
        add("manifest.json", json.dumps([{"Config": "config.json", "Layers": names}]).encode())
    return archives.Archive("x:1", "sha256:x", path, 0, tuple(f"sha256:{i}" for i in range(len(names))))


def _members(path) -> dict[str, bytes | None]:
    with gzip.open(path) as raw, tarfile.open(fileobj=raw) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar.getmembers()}


@pytest.mark.parametrize("oci", [False, True], ids=["docker-save", "oci-layout"])
def test_the_host_gets_only_the_layers_above_those_it_has(tmp_path, oci):
    archive = _saved(tmp_path / "a.tar.gz", {"base": b"B" * 1000, "pip": b"P" * 500, "top": b"T"}, oci=oci)
    before_docker_25 = "24.0.7"  # no filling: the chains alone decide

    assert archives.for_host(archive, None).path == archive.path
    assert archives.for_host(archive, _engine(["sha256:unrelated"], version=before_docker_25)).path == archive.path

    shipment = archives.for_host(archive, _engine(archive.diff_ids[:2], version=before_docker_25))
    partial = shipment.path
    assert partial != archive.path and not shipment.plan.fills
    members = _members(partial)
    top = "blobs/sha256/top" if oci else "top/layer.tar"
    assert members[top] == b"T"
    assert not [name for name in members if "base" in name or "pip" in name], members
    assert json.loads(members["manifest.json"])[0]["Layers"][-1] == top
    # Written once per number of layers left out, then reused.
    assert archives.for_host(archive, _engine(archive.diff_ids[:2], version=before_docker_25)).path == partial


@pytest.mark.parametrize("oci", [False, True], ids=["docker-save", "oci-layout"])
def test_layers_the_host_holds_above_a_changed_one_stay_home_and_are_named_for_the_fill(tmp_path, oci):
    archive = _saved(tmp_path / "a.tar.gz", {"base": b"B" * 100, "bumped": b"N" * 50, "top": b"T" * 400}, oci=oci)
    base, _, top = archive.diff_ids
    shipment = archives.for_host(archive, _engine([base, "sha256:old", top]))
    assert shipment.plan == archives.LayerPlan(1, (1,), (archives.Fill("sha256:img0", (top,)),))
    members = _members(shipment.path)
    assert members["blobs/sha256/bumped" if oci else "bumped/layer.tar"] == b"N" * 50
    assert not [name for name in members if "base" in name or "top" in name], members
    top_file = "blobs/sha256/top" if oci else "top/layer.tar"
    assert shipment.fill_files(archive.diff_ids) == {top: (top_file,)}
    assert shipment.unpacked_bytes == 450  # the sent and the filled layer files, unpacked


def test_a_layer_that_links_to_a_left_out_one_gets_the_whole_archive(tmp_path):
    # Docker 20.10 saves a second layer of the same content as a link to the first's file.
    archive = _saved(tmp_path / "a.tar.gz", {"base": b"B" * 100, "top": b"T"}, links={"again": "base"})
    shipment = archives.for_host(archive, _engine(archive.diff_ids[:1], version="24.0.7"))
    assert shipment.path == archive.path and shipment.plan.whole
    assert not list(tmp_path.glob("*.partial")), "a half-written archive was left behind"


def test_deploys_writing_the_same_archive_at_once_all_get_it_whole(tmp_path):
    # Two deploys from one checkout (or the test workers) may write one cache entry at once.
    archive = _saved(tmp_path / "a.tar.gz", {"base": os.urandom(4 << 20), "top": os.urandom(1 << 20)})
    destination = tmp_path / "a-above-1.tar.gz"
    args = (archive.path, ["base/layer.tar"], ["top/layer.tar"], destination)
    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        for future in [pool.submit(archives._write_without, *args) for _ in range(4)]:
            future.result()
    assert _members(destination)["top/layer.tar"] == _members(archive.path)["top/layer.tar"]
    assert not list(tmp_path.glob("*partial*")), "a partial file was left behind"


def test_a_failed_docker_save_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """A stand-in docker whose save fails at once (an image removed meanwhile, a full disk)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\necho 'Error response from daemon: no such image' >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "images"
    monkeypatch.setattr(archives, "archive_path", lambda image_id: cache / "0123456789abcdef.tar.gz")
    with pytest.raises(RuntimeError, match="docker save x:1 failed with exit 1"):
        archives._save("x:1", "sha256:0123456789abcdef", {"Size": 10})
    assert list(cache.iterdir()) == []


def test_an_image_the_controllers_engine_lacks_is_named(monkeypatch):
    images = archives.ControllerImages()
    monkeypatch.setattr(images, "inspect", lambda ref: None)
    with pytest.raises(RuntimeError, match="image lab:gone is not in the controller's engine"):
        images.image_id("lab:gone")


def test_a_compressor_that_fails_is_named_with_the_archive(tmp_path):
    broken = archives.Codec("broken", ".tar.x", ("sh", "-c", "cat >/dev/null; exit 3"), ("cat",))
    path = tmp_path / "a.tar.x"
    with (
        pytest.raises(RuntimeError, match=f"sh -c .* failed with exit 3 writing {path}"),
        archives.open_compressed(path, "wb", broken) as out,
    ):
        out.write(b"data")


def _tar(members: dict[str, bytes | None]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def test_a_tar_without_a_manifest_is_refused():
    with pytest.raises(RuntimeError, match=r"the archive has no manifest\.json"):
        archives._read_index(_tar({"abc/layer.tar": b"x"}))
    with pytest.raises(RuntimeError, match=r"manifest\.json is not a file"):
        archives._read_index(_tar({"manifest.json": None}))


def test_the_disk_a_host_needs_is_for_what_it_loads_not_the_whole_image(tmp_path):
    # A 30 MB bump of an 8 GB image must not ask a host for 20 GB free.
    archive_file = tmp_path / "a.tar.zst"
    archive_file.write_bytes(b"x" * 1000)
    partial = tmp_path / "a-above-3.tar.zst"
    partial.write_bytes(b"x" * 100)
    archive = archives.Archive("x:1", "sha256:x", archive_file, 8_000_000, tuple(DIFF_IDS))
    whole = archives.Shipment(archive_file, archives.LayerPlan(0, (0, 1, 2, 3)), (), 0)
    assert whole.needed_bytes(archive) == archive.needed_bytes == int(2 * 8_000_000 * archives.DISK_FACTOR)
    above = archives.Shipment(partial, archives.LayerPlan(3, (3,)), (), 30_000)
    assert above.needed_bytes(archive) == int(2 * 30_000 * archives.DISK_FACTOR)
    filled = archives.Shipment(partial, archives.LayerPlan(1, (1,), (archives.Fill("sha256:img", ("x",)),)), (), 30_000)
    assert filled.needed_bytes(archive) == int((100 + 3 * 30_000) * archives.DISK_FACTOR)


def test_a_reused_partial_archive_counts_as_used_for_the_pruning(tmp_path):
    archive = _saved(tmp_path / "a.tar.gz", {"base": b"B" * 100, "top": b"T"})
    engine = _engine(archive.diff_ids[:1], version="24.0.7")
    partial = archives.for_host(archive, engine).path
    os.utime(partial, (1_000_000, 1_000_000))
    assert archives.for_host(archive, engine).path == partial
    assert partial.stat().st_mtime > 1_000_000


def _stand_in_save(tmp_path, monkeypatch):
    """A stand-in docker: `save` prints a small docker-save tar, `image ls` the engine's one id;
    the cache holds an old archive of an image the engine no longer has."""
    layer_tar = tmp_path / "saved.tar"
    with tarfile.open(layer_tar, "w") as tar:
        for name, data in {"l1/layer.tar": b"L" * 100, "manifest.json": b'[{"Layers": ["l1/layer.tar"]}]'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    new_id = "sha256:" + "1" * 64
    (bin_dir / "docker").write_text(
        f'#!/bin/sh\ncase "$1" in\n  save) cat {layer_tar};;\n  image) echo {new_id};;\nesac\n'
    )
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "images"
    cache.mkdir()
    gone = cache / ("2" * 16 + ".tar.gz")
    gone.write_bytes(b"old")
    os.utime(gone, (1_000_000, 1_000_000))
    monkeypatch.setattr(archives, "archive_path", lambda image_id: cache / (image_id[7:23] + ".tar.gz"))
    return new_id, gone


def test_a_new_archive_is_saved_then_the_cache_pruned_and_the_removal_reported(tmp_path, monkeypatch, caplog):
    new_id, gone = _stand_in_save(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        archive = archives._save("lab:1", new_id, {"Size": 100, "RootFS": {"Layers": ["sha256:l1"]}})
    assert archive.path.exists() and not gone.exists()
    assert archives._index(archive)["layers"] == ["l1/layer.tar"]
    assert "removed 1 file(s) of older image archives from build/images/" in caplog.text


def test_a_prune_that_fails_does_not_fail_the_save(tmp_path, monkeypatch, caplog):
    new_id, gone = _stand_in_save(tmp_path, monkeypatch)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(gone))

    monkeypatch.setattr(archive_cache, "prune", denied)
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        archive = archives._save("lab:1", new_id, {"Size": 100, "RootFS": {"Layers": ["sha256:l1"]}})
    assert archive.path.exists() and gone.exists()
    assert f"could not remove older image archives: [Errno 13] Permission denied: '{gone}'" in caplog.text
