"""Archives without the layers a host has: chain ids, which layers to leave out, the written archive."""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import os
import tarfile

import pytest

from labfleet import archives
from labfleet.facts.image import parse_layer_chains

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


def test_the_fact_gives_every_images_chains_or_none_on_the_containerd_store():
    lines = [json.dumps(DIFF_IDS[:1]), json.dumps(DIFF_IDS)]
    assert parse_layer_chains(lines) == set(ENGINE_CHAIN_IDS)
    assert parse_layer_chains([]) == set()
    assert parse_layer_chains(["containerd"]) is None


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
    chains = archives.chain_ids(archive.diff_ids)

    assert archives.for_host(archive, None) == archive.path
    assert archives.for_host(archive, {"sha256:unrelated"}) == archive.path

    partial = archives.for_host(archive, set(chains[:2]))
    assert partial != archive.path
    members = _members(partial)
    top = "blobs/sha256/top" if oci else "top/layer.tar"
    assert members[top] == b"T"
    assert not [name for name in members if "base" in name or "pip" in name], members
    assert json.loads(members["manifest.json"])[0]["Layers"][-1] == top
    # Written once per number of layers left out, then reused.
    assert archives.for_host(archive, set(chains[:2])) == partial


def test_a_layer_that_links_to_a_left_out_one_gets_the_whole_archive(tmp_path):
    # Docker 20.10 saves a second layer of the same content as a link to the first's file.
    archive = _saved(tmp_path / "a.tar.gz", {"base": b"B" * 100, "top": b"T"}, links={"again": "base"})
    chains = archives.chain_ids(archive.diff_ids)
    assert archives.for_host(archive, set(chains[:1])) == archive.path
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
