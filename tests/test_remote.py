"""Remote datasets against REAL servers on 127.0.0.1: moto_server (the S3 REST API) and a
ThreadingHTTPServer with Range support, both subprocesses started and stopped here.
Faults: server killed mid-epoch, corrupt shard, bounded/full cache, two processes on one
cache, unreachable URL, wrong credentials, missing objects, a different dataset."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

pytest.importorskip("obstore")

from fastload.format import remote
from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader

from _ddp_loader_worker import write_dataset
from _remote_servers import (HERE, Moto, RangeHTTP, assert_same_batches, check_epoch_equals_local,
                             decomposed_roundtrip, environment, epoch_batches)

S = 16


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("rl") / "d"), n=40, shard_size=10)


@pytest.fixture(scope="module")
def moto(local_ds):
    m = Moto()
    try:
        with environment(m.env):
            m.url = m.upload(local_ds, "data", "imagenet-tiny")
            yield m
    finally:
        m.stop()


@pytest.fixture
def http(local_ds, tmp_path):
    root = tmp_path / "srv"
    shutil.copytree(local_ds, root / "ds")
    srv = RangeHTTP(str(root), str(tmp_path / "get.log"))
    srv.ds_url = srv.url + "/ds"
    yield srv
    srv.kill()


_batches, _same = epoch_batches, assert_same_batches


def _shard_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".arrow") and ".tmp-" not in f)


def _drop_meta_index(root):
    """Make ``root`` a dataset written before meta-index.ipc existed (its readers fall back
    to each shard's footer and columns by ranged GETs)."""
    import json

    p = os.path.join(root, "manifest.json")
    m = json.load(open(p))
    m.pop("meta_index")
    with open(p, "w") as f:
        json.dump(m, f)
    os.unlink(os.path.join(root, "meta-index.ipc"))


# ------------------------------------------------------------------------------ S3 (moto)
def test_s3_epoch_equals_local(moto, local_ds, tmp_path):
    check_epoch_equals_local(moto.url, local_ds, tmp_path)


def test_s3_checksum_mismatch_names_url(moto, local_ds, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(local_ds, bad)
    p = bad / "shard-00002.arrow"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF  # same size, one byte off: only the sha256 tells
    p.write_bytes(bytes(b))
    import json

    m = json.loads((bad / "manifest.json").read_text())
    json.dump(m, open(bad / "manifest.json", "w"))  # manifest keeps the good checksums
    url = moto.upload(str(bad), "data", "corrupt")
    ds = ReinforcedDataset(url, cache_dir=str(tmp_path / "c"))
    with pytest.raises(remote.ChecksumError, match=r"s3://data/corrupt/shard-00002\.arrow.*sha256"):
        ds.gather(np.arange(20, 22), np.zeros(2, np.int64))
    assert not any("shard-00002" in f for f in os.listdir(ds.remote.dir))  # nothing half cached
    ds.gather(np.arange(0, 2), np.zeros(2, np.int64))  # the good shards still serve


def test_s3_bad_inputs_fail_fast_naming_url(moto, tmp_path, local_ds):
    t0 = time.time()
    with pytest.raises(remote.RemoteError, match=r"s3://data/nothing-here.*no manifest.json"):
        ReinforcedDataset("s3://data/nothing-here", cache_dir=str(tmp_path))
    with pytest.raises(remote.RemoteError, match=r"s3://no-such-bucket/x"):
        ReinforcedDataset("s3://no-such-bucket/x", cache_dir=str(tmp_path))
    # a shard listed by the manifest but missing in the bucket
    c = moto.client()
    url = moto.upload(local_ds, "data", "holey")
    c.delete_object(Bucket="data", Key="holey/shard-00001.arrow")
    ds = ReinforcedDataset(url, cache_dir=str(tmp_path), predownload=0)  # metadata: meta-index.ipc
    with pytest.raises(remote.RemoteError, match=r"s3://data/holey/shard-00001\.arrow: not found"):
        ds.gather(np.array([10]), np.zeros(1, np.int64))
    # a dataset without the index reads each shard's footer at open: it fails there
    c.delete_object(Bucket="data", Key="holey/meta-index.ipc")
    with pytest.raises(remote.RemoteError, match=r"s3://data/holey/shard-00001\.arrow: not found"):
        ReinforcedDataset(url, cache_dir=str(tmp_path / "2"))
    assert time.time() - t0 < 20


def test_s3_different_dataset_is_a_clear_error(moto, tmp_path):
    import fastload

    d = tmp_path / "dec"
    toks = np.random.default_rng(0).integers(0, 256, 6000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 6001, 300)), str(d), min_bucket=4, max_bucket=6,
                       vocab_size=257, eot_id=256, progress=False)
    url = moto.upload(str(d), "data", "tokens")
    with pytest.raises(ValueError, match=r"s3://data/tokens/manifest.json: not a fastload reinforced"):
        ReinforcedDataset(url, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"s3://data/imagenet-tiny/manifest.json: not a fastload-decomposition manifest"):
        fastload.DecompositionLoader(moto.url, tokens_per_step=64, cache_dir=str(tmp_path / "c"))


def test_s3_decomposed_matches_local(moto, tmp_path):
    import fastload

    url = decomposed_roundtrip(moto.upload, tmp_path)
    with pytest.raises(remote.CacheFullError, match="cache_limit"):
        fastload.DecompositionLoader(url, tokens_per_step=256, cache_dir=str(tmp_path / "c2"), cache_limit=1000)


@pytest.mark.slow
def test_s3_wrong_credentials(local_ds, tmp_path):
    m = Moto(auth=True)  # a second server that checks signatures against its IAM
    env = dict(os.environ, **m.env)
    env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = "AKIAWRONGWRONGWRONG", "not-the-secret"
    code = textwrap.dedent(f"""
        import time, sys
        from fastload.format.reader import ReinforcedDataset
        t0 = time.time()
        try:
            ReinforcedDataset("s3://data/x", cache_dir={str(tmp_path)!r})
        except OSError as e:
            print("ERR", time.time() - t0, e)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    finally:
        m.stop()
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert "s3://data/x" in out.stdout and "access denied" in out.stdout
    assert "not-the-secret" not in out.stdout + out.stderr  # credentials never logged
    assert float(out.stdout.split()[1]) < 10


# --------------------------------------------------------------------------- HTTP (range)
def test_http_cache_limit_evicts_and_epoch_is_exact(http, local_ds, tmp_path):
    size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), cache_limit=int(2.5 * size),
                           predownload=1)
    loc = ReinforcedDataset(local_ds)
    for epoch in (0, 1):  # one shard per step: the folder stays within the limit
        _same(_batches(ds, epoch=epoch, batch_size=10, shuffle=False),
              _batches(loc, epoch=epoch, batch_size=10, shuffle=False))
        ds._open.clear()  # the maps (leases) go: what is left is evictable
        assert ds.remote.trim() <= 2.5 * size
        held = sum(os.path.getsize(os.path.join(ds.remote.dir, f)) for f in _shard_files(ds.remote.dir))
        assert held <= 2.5 * size
    assert ds.remote.stats["evictions"] > 0
    # shuffled, a step (its MixUp/CutMix partners included) reads 3-4 of the 4 shards: those
    # are mapped (leased), never evicted under the reader (their blocks would stay on disk);
    # the folder exceeds the limit by them only, and the epoch is exact
    for epoch in (0, 1):
        _same(_batches(ds, epoch=epoch), _batches(loc, epoch=epoch))
    ds._open.clear()
    ds.remote.plan([])
    assert ds.remote.trim() <= 2.5 * size
    with pytest.raises(remote.CacheFullError, match=r"cache folder .*cache_limit=100 bytes"):
        small = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c3"), cache_limit=100)
        small.gather(np.arange(2), np.zeros(2, np.int64))


def test_http_predownload_follows_plan(http, local_ds, tmp_path):
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=2)
    landed = _Landed(ds.remote)
    remote.predownload_rows(ds, [35, 36, 25, 5, 15])  # shards 3, 2, 0, 1
    names = landed.wait(3)
    assert any("shard-00003" in f for f in names) and any("shard-00002" in f for f in names)
    assert any("shard-00000" in f for f in names)  # window of 2 ahead of the first shard
    ds.remote.close()


class _Landed:
    """Woken by the cache itself after each download it commits (its ``_download`` wrapped on
    the instance, before any predownload thread starts): tests wait on that condition, not
    on sleeps. The timeout only bounds a failing test."""

    def __init__(self, cache):
        self.cv, self.dir, orig = threading.Condition(), cache.dir, cache._download

        def download(pos, res):
            try:
                return orig(pos, res)
            finally:
                with self.cv:
                    self.cv.notify_all()

        cache._download = download

    def wait(self, n, timeout=60.0):
        with self.cv:
            ok = self.cv.wait_for(lambda: len(_shard_files(self.dir)) >= n, timeout)
        assert ok, f"{n} shards expected in {self.dir}, found {_shard_files(self.dir)}"
        return _shard_files(self.dir)


def test_loader_drives_predownload_from_its_own_order(http, local_ds, tmp_path):
    """A plain ReinforcedLoader (no BlockShuffleSampler) hands the cache its order: while the
    first batch is out, the next shards arrive without being asked for, and the server sees
    one GET per shard."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=2)
    landed = _Landed(ds.remote)
    loader = ReinforcedLoader(ds, seed=3, image_size=S, batch_size=10, shuffle=False)
    it = iter(loader)
    first = next(it)  # reads shard 0 only (one shard per batch, in order)
    names = landed.wait(3)
    assert [any(f"shard-{k:05d}" in f for f in names) for k in range(3)] == [True, True, True]
    rest = [first] + list(it)
    _same([tuple(x.clone() for x in b) for b in rest], _batches(ReinforcedDataset(local_ds), batch_size=10,
                                                               shuffle=False))
    for k in range(4):
        assert http.full_gets(f"shard-{k:05d}.arrow") == 1
    ds.remote.close()


def test_loader_predownload_resumes_mid_epoch(http, local_ds, tmp_path):
    """Resumed at step 2 of 4, the plan starts at the resumed step: the shards of the steps
    already done are not predownloaded (the test data's MixUp/CutMix partners, read from
    any shard, are fetched when their batch needs them)."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    loader = ReinforcedLoader(ds, seed=3, image_size=S, batch_size=10, shuffle=False)
    loader.load_state_dict({**loader.state_dict(), "step": 2})
    it = iter(loader)
    assert ds.remote._plan.tolist() == [2, 3] and ds.remote._step_starts.tolist() == [0, 1]
    assert _shard_files(ds.remote.dir) == []  # nothing fetched before the first batch is asked for
    assert len(list(it)) == 2


def test_predownload_window_counts_distinct_shards_beyond_the_step(http, tmp_path):
    """Blocks of shards (BlockShuffleSampler): each step reads its whole block and the next
    steps read it again. The window is the step's shards plus ``predownload`` distinct shards
    after them, so the next block downloads while this one is read (counting plan entries,
    the window never left the block and the reader waited at every block start)."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    c = ds.remote
    c.predownload = 2
    blocks = [np.array([0, 1])] * 3 + [np.array([2, 3])] * 3
    c.plan_steps(blocks)
    assert c._window(c._plan, c._cursor) == [0, 1, 2, 3]
    c.at_step(3)
    assert c._window(c._plan, c._cursor) == [2, 3]  # the end of the plan
    c.plan_steps([np.array([3, 1, 0])] + [np.array([2])])
    c.predownload = 0
    assert c._window(c._plan, c._cursor) == [3, 1, 0]  # the step itself, always
    c.plan(np.array([1, 0, 1, 2, 3]))  # no steps: one shard is the step
    c.predownload = 2
    assert c._window(c._plan, c._cursor) == [1, 0, 2]
    c.close()


def test_predownload_skips_a_shard_someone_else_is_downloading(http, local_ds, tmp_path):
    """fetch_ahead(wait=False) leaves a shard whose lock another process holds (None) and the
    predownload thread goes on with the next one in its window: two downloads side by side."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    c = ds.remote
    lock = remote._FileLock(os.path.join(c.dir, "locks", os.path.basename(c.local_name(0)) + ".lock"))
    held = threading.Event()
    release = threading.Event()

    def other():  # stands for the reader downloading shard 0
        with lock:
            held.set()
            release.wait(20)

    th = threading.Thread(target=other)
    th.start()
    try:
        assert held.wait(20)
        assert c.fetch_ahead(0, wait=False) is None and not os.path.exists(c.local_name(0))
        c.predownload = 1
        landed = _Landed(c)
        c.plan_steps([np.array([0]), np.array([1])])
        files = landed.wait(1)
        assert [f.split("-", 1)[1] for f in files] == ["shard-00001.arrow"]  # 1 went ahead of the busy 0
    finally:
        release.set()
        th.join()
    assert sorted(f.split("-", 1)[1] for f in landed.wait(2)) == ["shard-00000.arrow", "shard-00001.arrow"]
    c.close()


def test_rank_batches_move_the_predownload_window(http, local_ds, tmp_path):
    """BlockShuffleSampler.batch_sampler(dataset=remote) plans the cache step by step and
    moves its window as each batch is drawn, like the loader's own order."""
    from fastload.batch.shuffle import BlockShuffleSampler

    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    sampler = BlockShuffleSampler(ds, block_shards=2, seed=0, partitions=2, global_batch_size=8)
    bs = sampler.batch_sampler(8, rank=1, world_size=2, dataset=ds)
    it = iter(bs)
    per = sampler.shards_for_steps(0, 0, len(bs), 8, 1, 2)
    assert ds.remote._step_starts is None  # planned when iteration starts
    next(it)
    starts = ds.remote._step_starts
    assert len(starts) == len(per) and ds.remote._plan.tolist()[:len(per[0])] == per[0].tolist()
    for k, _ in enumerate(it, 1):
        assert ds.remote._cursor >= starts[k]


def test_ranged_file_reads_exactly_the_bytes_asked(tmp_path):
    """The metadata reader's readahead (one GET at the end, one at the batch header) returns
    the object's own bytes for any seek/read sequence, and a short object is an error."""
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()

    class Client:
        url, n = "http://127.0.0.1:1/x", 0

        def get_range(self, key, a, b):
            Client.n += 1
            assert 0 <= a <= b  # a real server answers a range past the end with what it has
            return blob[a:b]

    f = remote._RangedFile(Client(), "k", len(blob))
    for _ in range(300):
        a = int(rng.integers(0, len(blob)))
        n = int(rng.integers(0, 20_000))
        f.seek(a)
        assert f.read(n) == blob[a:a + n]
    f.seek(-10, 2)
    assert f.read(10) == blob[-10:]
    g = remote._RangedFile(Client(), "k", len(blob))
    Client.n = 0
    g.seek(-10, 2), g.read(10), g.seek(-600, 2), g.read(590)  # the tail, then the footer
    assert Client.n == 1
    short = remote._RangedFile(Client(), "k", len(blob) + 50)
    short.seek(0)
    with pytest.raises(remote.RemoteError, match=r"http://127.0.0.1:1/x/k: .* shorter"):
        short.read(len(blob) + 50)


def test_predownload_evicts_only_later_shards(http, local_ds, tmp_path):
    """The rule itself: ahead of the reader, a shard read before is evicted (never used
    again), a shard needed sooner than the one being fetched is not: the fetch waits."""
    size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0,
                           cache_limit=int(2.2 * size))
    c = ds.remote
    c.plan_steps([np.array([0]), np.array([1]), np.array([2]), np.array([3])])
    c.fetch(0)
    c.at_step(1)
    c.fetch(1)
    assert c.fetch_ahead(2) is True  # evicts shard 0 (done) to make room
    held = [f.split("-", 1)[1] for f in _shard_files(c.dir)]
    assert sorted(held) == ["shard-00001.arrow", "shard-00002.arrow"]
    assert c.fetch_ahead(3) is False  # 1 and 2 are needed before 3: nothing is evicted
    assert sorted(f.split("-", 1)[1] for f in _shard_files(c.dir)) == sorted(held)
    c.at_step(3)
    c.fetch(3)  # the reader needs 3 now: it may evict (1 and 2 are behind it)
    assert "shard-00003.arrow" in [f.split("-", 1)[1] for f in _shard_files(c.dir)]


def test_downloads_side_by_side_reserve_their_full_size(http, local_ds, tmp_path):
    """A download in flight counts at its shard's full size, not at the part written so far:
    with room for 1.5 shards, the reader's shard 0 waits while the predownload's shard 1 is
    being written, then evicts it, so the two never sit in the cache together (they did when
    the reader measured shard 1 half written). A leftover from a killed process is removed."""
    size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0,
                           cache_limit=int(1.5 * size))
    c = ds.remote
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(c.dir, f"0123456789abcdef-x.arrow.tmp-{dead.pid}-1"), "wb") as f:
        f.truncate(size)  # a killed rank's reservation: it would leave no room at all
    c.plan_steps([np.array([0]), np.array([1])])
    gate, started, errors = threading.Event(), threading.Event(), []
    real = c.client.stream_to

    def slow(key, dst_open, on_chunk):
        if not key.endswith("shard-00001.arrow"):
            return real(key, dst_open, on_chunk)

        def held(f, b):
            started.set()
            assert gate.wait(20)
            on_chunk(f, b)
        return real(key, dst_open, held)

    def run(fn, *a):
        try:
            fn(*a)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    busy = threading.Event()
    real_reserve = c._reserve

    def reserve(pos, ahead=False, disk_full=False):
        got = real_reserve(pos, ahead=ahead, disk_full=disk_full)
        if pos == 0 and got == "busy":
            busy.set()
        return got

    c._reserve = reserve
    c.client.stream_to = slow
    ahead = threading.Thread(target=run, args=(c.fetch_ahead, 1))
    ahead.start()
    assert started.wait(20)
    reader = threading.Thread(target=run, args=(c.fetch, 0))
    reader.start()
    assert busy.wait(20), errors  # shard 0 waits for shard 1's bytes (a reservation in flight)
    assert reader.is_alive() and _shard_files(c.dir) == []
    gate.set()
    ahead.join(20)
    reader.join(20)
    assert not errors, errors
    assert [f.split("-", 1)[1] for f in _shard_files(c.dir)] == ["shard-00000.arrow"]
    assert not [f for f in os.listdir(c.dir) if ".tmp-" in f]
    assert c.stats["downloads"] == 2 and c.stats["evictions"] == 1


def test_predownload_stays_within_a_small_cache(http, local_ds, tmp_path):
    """cache_limit of 1.5 shards with a window of 3: the predownload waits instead of
    evicting a shard needed sooner (it never raises CacheFullError, never goes over the limit:
    only the reader may, by shards it has mapped); the shuffled epoch is exact and, once the
    maps are gone, the folder is within the limit."""
    size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=3,
                           cache_limit=int(1.5 * size))
    over = []
    real = ds.remote._reserve

    def spy(pos, ahead=False, disk_full=False):
        before = ds.remote.stats["over_limit"]
        got = real(pos, ahead=ahead, disk_full=disk_full)
        if ahead and ds.remote.stats["over_limit"] != before:
            over.append(pos)
        return got

    ds.remote._reserve = spy
    for epoch in (0, 1):
        _same(_batches(ds, epoch=epoch), _batches(ReinforcedDataset(local_ds), epoch=epoch))
    assert over == []
    ds._open.clear()
    ds.remote.plan([])  # the epoch is over: no shard is needed next
    assert ds.remote.trim() <= 1.5 * size
    ds.remote.close()


@pytest.mark.slow
def test_http_server_killed_mid_epoch_then_restarted(http, local_ds, tmp_path):
    """The server dies as the epoch starts (the dataset is open: its metadata came in
    meta-index.ipc; every shard is still to come) and comes back 1.5 s later: the loader's
    bounded retries bridge the gap and the epoch is bit-identical to a local run. (It died
    after 2 batches before; with this small dataset every shard arrives with the first batch
    and stays, over the limit, as every step reads it, so nothing was fetched in the outage
    but a footer read the meta index now makes unnecessary.)"""
    size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
    # a cache of 1.5 shards: reads by range and downloads go on all epoch long, so some
    # fall in the outage (shards a step maps stay: those are not downloaded again)
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0,
                           cache_limit=int(1.5 * size))
    ds.remote.client.retries = 8  # ~32 s of backoff: room for a slow restart on a loaded CI machine
    want = _batches(ReinforcedDataset(local_ds))
    loader = ReinforcedLoader(ds, seed=3, image_size=S, batch_size=6, shuffle=True, prefetch_factor=1)
    http.kill()
    port = http.port

    def restart():
        time.sleep(1.5)
        http.__init__(http.root, http.log, port=port)

    th = threading.Thread(target=restart)
    th.start()
    got = [tuple(x.clone() for x in b) for b in loader]
    th.join()
    _same(got, want)
    assert ds.remote.client.retried > 0  # the outage was hit, and bridged


def test_http_unreachable_is_quick_and_named(tmp_path):
    from _remote_servers import free_port

    url = f"http://127.0.0.1:{free_port()}/ds"
    t0 = time.time()
    with pytest.raises(remote.RemoteError, match=rf"{url}/manifest.json: get failed after"):
        ReinforcedDataset(url, cache_dir=str(tmp_path))
    assert time.time() - t0 < 15


def test_http_403_is_access_denied_without_retries(local_ds, tmp_path):
    srv = RangeHTTP(local_ds, str(tmp_path / "log"), status=403)
    try:
        t0 = time.time()
        with pytest.raises(remote.RemoteError, match=rf"{srv.url}/ds/manifest.json: access denied"):
            ReinforcedDataset(srv.url + "/ds", cache_dir=str(tmp_path))
        assert time.time() - t0 < 3
    finally:
        srv.kill()


_TWO = """
import sys, numpy as np
from fastload.format.reader import ReinforcedDataset
ds = ReinforcedDataset(sys.argv[1], cache_dir=sys.argv[2], predownload=0)
for s in range(0, len(ds), 5):
    ds.gather(np.arange(s, min(len(ds), s + 5)), np.zeros(min(5, len(ds) - s), np.int64))
print(ds.remote.stats["downloads"])
"""


def test_two_processes_share_one_cache(http, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    cache = str(tmp_path / "shared")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO, http.ds_url, cache], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(int(o.strip().splitlines()[-1]) for o, _ in outs) == 4  # 4 shards, once in all
    for k in range(4):
        assert http.full_gets(f"shard-{k:05d}.arrow") == 1  # counted by the server


_FULL = """
import resource, signal, sys, numpy as np
from fastload.format.reader import ReinforcedDataset
from fastload.format.remote import CacheFullError
ds = ReinforcedDataset(sys.argv[1], cache_dir=sys.argv[2], predownload=0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a full disk: writes past 20 KB fail (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    ds.gather(np.arange(2), np.zeros(2, np.int64))
except CacheFullError as e:
    print("FULL", e)
"""


def test_full_cache_disk_is_a_clear_error(http, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    out = subprocess.run([sys.executable, "-c", _FULL, http.ds_url, str(tmp_path / "c")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert "FULL" in out.stdout, out.stdout + out.stderr
    assert "is full" in out.stdout and http.ds_url + "/shard-00000.arrow" in out.stdout
    d = [x for x in os.listdir(tmp_path / "c") if x != "locks"]
    leftovers = [f for f in os.listdir(tmp_path / "c" / d[0]) if ".tmp-" in f]
    assert leftovers == []  # no half shard left behind


def test_a_small_disk_with_mapped_shards_is_not_full(hashed, tmp_path):
    """The cache on a 60 KiB tmpfs (shards of ~23 KB, and the small files: meta/, manifest),
    no cache_limit, a sequential epoch (one shard per step) with predownload: a full disk
    evicts shards that are no longer mapped, and only those. Before, the evicted files were
    still mapped by the reader, their blocks stayed in use, and the retry raised
    CacheFullError with the folder nearly empty."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ds = ReinforcedDataset(hashed.ds_url, cache_dir=str(mnt), predownload=2, partner_reads="range")
        for epoch in (0, 1):
            got = _batches(ds, epoch=epoch, batch_size=10, shuffle=False)
            _same(got, _batches(ReinforcedDataset(hashed.local), epoch=epoch, batch_size=10, shuffle=False))
        assert ds.remote.stats["evictions"] > 0
        ds.remote.close()
        del ds, got
    finally:
        import gc

        gc.collect()
        subprocess.run(["umount", "-l", str(mnt)])


def test_stale_metadata_cache_is_caught_on_download(http, tmp_path):
    """Metadata comes from ranged GETs before the shard is downloaded; once the shard is
    downloaded and its sha256 verified, the two must agree. Here the object holds other
    labels while the dataset opens (a rewrite in progress) and the listed one again when it
    is downloaded: the bytes the metadata came from differ, which is named."""
    import pyarrow as pa

    _drop_meta_index(os.path.join(http.root, "ds"))
    served = os.path.join(http.root, "ds", "shard-00001.arrow")
    original = open(served, "rb").read()
    b = pa.ipc.open_file(pa.py_buffer(original)).get_batch(0)
    cols = [pa.array((np.asarray(b.column("label")) + 1) % 10) if n == "label" else b.column(n)
            for n in b.schema.names]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, b.schema) as w:
        w.write_batch(pa.record_batch(cols, schema=b.schema))
    with open(served, "wb") as f:
        f.write(sink.getvalue().to_pybytes())
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    with open(served, "wb") as f:
        f.write(original)
    meta_dir = os.path.join(ds.remote.dir, "meta")
    name = ds.remote.shards[1]["sha256"][:16] + ".arrow"
    assert os.path.exists(os.path.join(meta_dir, name))
    with pytest.raises(remote.ChecksumError, match=r"shard-00001.arrow: the metadata columns .* differ"):
        ds.gather(np.array([10]), np.zeros(1, np.int64))
    assert not os.path.exists(os.path.join(meta_dir, name))  # dropped: the next open re-reads it
    ds2 = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    assert ds2.labels[10:20].tolist() == b.column("label").to_pylist()


def test_metadata_without_source_spans_is_decoded_and_compared(http, tmp_path):
    """A meta/ entry without the spans it came from (or with columns that do not match the
    shard) is checked by decoding the shard's columns."""
    import pyarrow as pa

    _drop_meta_index(os.path.join(http.root, "ds"))
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    meta_dir = os.path.join(ds.remote.dir, "meta")
    name = ds.remote.shards[0]["sha256"][:16] + ".arrow"
    with open(os.path.join(meta_dir, name), "rb") as f:
        b = pa.ipc.open_file(pa.py_buffer(f.read())).get_batch(0).replace_schema_metadata(None)
    cols = [pa.array((np.asarray(b.column("label")) + 1) % ds.num_classes) if n == "label" else b.column(n)
            for n in b.schema.names]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, b.schema) as w:
        w.write_batch(pa.record_batch(cols, schema=b.schema))
    with open(os.path.join(meta_dir, name), "wb") as f:
        f.write(sink.getvalue().to_pybytes())
    ds2 = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    with pytest.raises(remote.ChecksumError, match=r"metadata columns .* differ"):
        ds2.gather(np.array([0]), np.zeros(1, np.int64))


@pytest.mark.slow
def test_s3_server_killed_mid_epoch_then_restarted(local_ds, tmp_path, monkeypatch):
    """moto_server is killed as the epoch starts (the dataset is open, every shard still to
    come; see the http variant for why not after 2 batches any more); a new one (same
    objects: storage outlives its front end) comes back behind the same endpoint ~2 s later:
    the epoch equals a local run."""
    from _remote_servers import TcpProxy

    box = {"m": Moto()}
    proxy = {"p": TcpProxy(box["m"].port)}
    env = dict(box["m"].env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy['p'].port}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        url = box["m"].upload(local_ds, "data", "ds")
        size = max(os.path.getsize(os.path.join(local_ds, f)) for f in _shard_files(local_ds))
        ds = ReinforcedDataset(url, cache_dir=str(tmp_path / "c"), predownload=0, cache_limit=int(1.5 * size))
        ds.remote.client.retries = 8  # ~32 s of backoff: room for a slow moto_server start in CI
        want = _batches(ReinforcedDataset(local_ds))
        loader = ReinforcedLoader(ds, seed=3, image_size=S, batch_size=6, shuffle=True, prefetch_factor=1)
        box["m"].proc.kill()  # the server dies...
        box["m"].proc.wait()
        proxy["p"].stop()     # ...and its endpoint refuses connections

        def restart():
            box["m"] = Moto()
            box["m"].upload(local_ds, "data", "ds")
            proxy["p"] = TcpProxy(box["m"].port, port=int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))

        th = threading.Thread(target=restart)
        th.start()
        got = [tuple(x.clone() for x in b) for b in loader]
        th.join()
        _same(got, want)
        assert ds.remote.client.retried > 0  # the outage was hit, and bridged
    finally:
        proxy["p"].stop()
        box["m"].stop()

_EXIT = """
import sys, time, numpy as np
from fastload.format.reader import ReinforcedDataset
from fastload.format import remote
ds = ReinforcedDataset(sys.argv[1], cache_dir=sys.argv[2], predownload=4)
remote.predownload_rows(ds, np.arange(len(ds)))
while not [f for f in __import__("os").listdir(ds.remote.dir) if ".tmp-" in f]:
    time.sleep(0.005)   # until a predownload thread is inside a (slow) GET (its reservation exists)
print("exiting")
"""


def test_process_exits_cleanly_during_predownload(local_ds, tmp_path):
    srv = RangeHTTP(local_ds, str(tmp_path / "log"), delay=1.0)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", _EXIT, srv.url, str(tmp_path / "c")], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "exiting" in out.stdout, out.stderr[-500:]
            assert "terminate called" not in out.stderr
    finally:
        srv.kill()


_EXIT_TIMED = """
import sys, time, threading, numpy as np
from fastload.format.reader import ReinforcedDataset
from fastload.format import remote
ds = ReinforcedDataset(sys.argv[1], cache_dir=sys.argv[2], predownload=4)
remote.predownload_rows(ds, np.arange(len(ds)))
while not [f for f in __import__("os").listdir(ds.remote.dir) if ".tmp-" in f]:
    time.sleep(0.005)   # a download is in flight (its reservation exists)
print("exiting", time.monotonic(), flush=True)
"""


@pytest.mark.slow
def test_exit_with_downloads_in_flight_is_quick_and_clean(local_ds, tmp_path):
    """20 exits while the predownload threads are inside slow GETs (the server waits 3 s
    before each body): each exit takes < 10 s (the stop flag cancels between chunks) and none
    aborts (no thread left inside the client at interpreter exit)."""
    srv = RangeHTTP(local_ds, str(tmp_path / "log"), delay=3.0)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
        waits = []
        for k in range(20):
            p = subprocess.Popen([sys.executable, "-c", _EXIT_TIMED, srv.url, str(tmp_path / f"c{k}")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = p.communicate(timeout=120)
            waits.append(time.monotonic() - float(out.split()[1]))
            assert p.returncode == 0 and "terminate called" not in err, err[-500:]
        assert max(waits) < 10, waits
    finally:
        srv.kill()


@pytest.mark.slow
def test_a_dead_server_mid_epoch_is_reported_in_about_8_s(http, tmp_path):
    """The reader waits for the predownload's download of the same shard, which spends its
    retries (7.75 s of backoff): the reader then tries once, not a second round (was 15-31 s)."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=2)
    it = iter(ReinforcedLoader(ds, seed=3, image_size=S, batch_size=10, shuffle=False))
    next(it)
    http.kill()
    for f in _shard_files(ds.remote.dir):
        os.unlink(os.path.join(ds.remote.dir, f))
    ds._open.clear()
    t0 = time.monotonic()
    with pytest.raises(remote.RemoteError, match=rf"{http.ds_url}/shard-0000\d\.arrow: get failed"):
        list(it)
    assert time.monotonic() - t0 < 9.5
    ds.remote.close()


def test_remote_dataset_pickles_for_workers(http, local_ds, tmp_path):
    from copy import deepcopy

    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=2)
    remote.predownload_rows(ds, np.arange(len(ds)))
    copy = deepcopy(ds)  # a DataLoader worker's copy (same __getstate__): no thread, no open maps
    assert copy.remote.url == ds.remote.url and copy.remote._threads == []
    loc = ReinforcedDataset(local_ds)
    a = copy.gather(np.arange(0, 40, 7), np.zeros(6, np.int64))
    b = loc.gather(np.arange(0, 40, 7), np.zeros(6, np.int64))
    assert [bytes(x) for x in a[0]] == [bytes(x) for x in b[0]]
    ds.remote.close()


# ------------------------------------------------------------------ partners by ranged GET
@pytest.fixture
def hashed(tmp_path):
    """A dataset whose ``hash`` column is the blake2b of the stored image (MixUp and CutMix
    on every sample), served by the Range HTTP server."""
    root = tmp_path / "srv"
    write_dataset(str(root / "ds"), n=40, shard_size=10, content_hash=True)
    srv = RangeHTTP(str(root), str(tmp_path / "get.log"))
    srv.ds_url, srv.local = srv.url + "/ds", str(root / "ds")
    yield srv
    srv.kill()


def test_partners_are_read_by_range_not_whole_shards(hashed, tmp_path):
    ds = ReinforcedDataset(hashed.ds_url, cache_dir=str(tmp_path / "c"), predownload=0, partner_reads="range")
    loader = ReinforcedLoader(ds, seed=3, image_size=S, batch_size=10, shuffle=False)
    it = iter(loader)
    first = tuple(x.clone() for x in next(it))  # rows 0-9 (shard 0); partners from all shards
    assert hashed.full_gets("shard-00000.arrow") == 1
    assert [hashed.full_gets(f"shard-{k:05d}.arrow") for k in (1, 2, 3)] == [0, 0, 0]
    assert ds.remote.stats["row_reads"] > 0 and ds.remote._locators
    got = [first] + [tuple(x.clone() for x in b) for b in it]
    _same(got, _batches(ReinforcedDataset(hashed.local), batch_size=10, shuffle=False))
    assert ds._ranged_partners
    for k in range(4):
        assert hashed.full_gets(f"shard-{k:05d}.arrow") == 1


def test_a_corrupt_partner_range_is_never_served(hashed, tmp_path):
    """One byte of row 35's image flipped on the server (the manifest keeps the good sha256):
    the ranged bytes fail the row hash, the whole shard is fetched to decide, and its sha256
    fails: a ChecksumError naming the shard, no image served."""
    import pyarrow as pa

    from fastload.format import ipc_layout

    p = os.path.join(hashed.local, "shard-00003.arrow")
    raw = bytearray(open(p, "rb").read())
    loc = ipc_layout.row_locator(lambda a, b: bytes(raw[a:b]), len(raw), pa.ipc.open_file(p).schema, "image")
    a, b = loc.span(5)
    raw[(a + b) // 2] ^= 0xFF
    ds = ReinforcedDataset(hashed.ds_url, cache_dir=str(tmp_path / "c"), predownload=0, partner_reads="range")
    open(p, "wb").write(bytes(raw))  # after the open: the metadata columns were read intact
    with pytest.raises(remote.ChecksumError, match=r"/ds/shard-00003\.arrow.*sha256"):
        ds.partner_images([35])
    good = ds.partner_images([5, 15])  # other rows still serve, by range
    assert [bytes(x) for x in good] == [bytes(x) for x in ReinforcedDataset(hashed.local).partner_images([5, 15])]


@pytest.mark.parametrize("index", [False, True], ids=["per_shard_meta", "meta_index"])
def test_a_consistent_edit_of_a_row_and_its_hash_is_an_error(hashed, tmp_path, index):
    """Row 35's image edited on the server (same size) AND its hash entry set to the edited
    bytes' blake2b: the ranged bytes match their row hash, but the row hashes read by range
    no longer match the manifest's hash_sha256: a ChecksumError naming the URL, nothing served
    (before, the edited image was served; a rank that never downloads the shard never knew).
    With meta-index.ipc the row hashes come from the verified index: the edited bytes fail
    their row hash, the whole shard is fetched to decide and fails its sha256."""
    import hashlib

    import pyarrow as pa

    from fastload.format import ipc_layout

    p = os.path.join(hashed.local, "shard-00003.arrow")
    raw = bytearray(open(p, "rb").read())
    loc = ipc_layout.row_locator(lambda a, b: bytes(raw[a:b]), len(raw), pa.ipc.open_file(p).schema, "image")
    a, b = loc.span(5)
    old = hashlib.blake2b(bytes(raw[a:b]), digest_size=16).digest()
    raw[(a + b) // 2] ^= 0xFF
    new = hashlib.blake2b(bytes(raw[a:b]), digest_size=16).digest()
    assert raw.count(old) == 1
    i = raw.find(old)
    raw[i:i + 16] = new
    open(p, "wb").write(bytes(raw))  # before the open: the hash column is read edited
    if not index:
        _drop_meta_index(hashed.local)
    ds = ReinforcedDataset(hashed.ds_url, cache_dir=str(tmp_path / "c"), predownload=0, partner_reads="range")
    with pytest.raises(remote.ChecksumError, match=r"/ds/shard-00003\.arrow: the row hashes read by range"
                       if not index else r"/ds/shard-00003\.arrow: downloaded .* sha256 .*not cached"):
        ds.partner_images([35])
    good = ds.partner_images([5, 15])  # other shards still serve, by range
    assert [bytes(x) for x in good] == [bytes(x) for x in ReinforcedDataset(hashed.local).partner_images([5, 15])]
    assert ds.remote.stats["downloads"] == 0


def test_reencoded_images_fall_back_to_whole_shards(http, local_ds, tmp_path):
    """The test data's hash column is not of the stored bytes (as for re-encoded sources): the
    first partner is decided by its verified shard, then partners come from whole shards."""
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0, partner_reads="range")
    loc = ReinforcedDataset(local_ds)
    assert bytes(ds.partner_images([35])[0]) == bytes(loc.image_bytes(35))
    assert not ds._ranged_partners and ds.remote.stats["row_reads"] == 1
    assert [bytes(x) for x in ds.partner_images([5, 25])] == [bytes(loc.image_bytes(i)) for i in (5, 25)]
    assert ds.remote.stats["row_reads"] == 1 and http.full_gets("shard-00000.arrow") == 1


def test_ipc_layout_survives_damaged_footers(local_ds):
    """Bytes flipped anywhere in the footer and batch header: a ValueError, or spans that
    still lie inside the file (never a crash or a read outside it)."""
    import pyarrow as pa

    from fastload.format import ipc_layout

    p = os.path.join(local_ds, "shard-00001.arrow")
    good = open(p, "rb").read()
    schema = pa.ipc.open_file(p).schema
    ref = ipc_layout.row_locator(lambda a, b: good[a:b], len(good), schema, "image")
    b = pa.ipc.open_file(p).get_batch(0)
    assert [good[slice(*ref.span(r))] for r in range(b.num_rows)] == b.column("image").to_pylist()
    body_start = ref.data_pos  # header and footer lie outside the image data
    hot = list(range(0, 512)) + list(range(len(good) - 2048, len(good)))
    rng = np.random.default_rng(0)
    raised = 0
    for _ in range(400):
        raw = bytearray(good)
        for i in rng.choice(hot, size=int(rng.integers(1, 4)), replace=False):
            raw[i] = int(rng.integers(0, 256))
        try:
            loc = ipc_layout.row_locator(lambda a, b: bytes(raw[a:b]), len(raw), schema, "image")
        except ValueError:
            raised += 1
            continue
        for r in range(loc.num_rows):
            a, e = loc.span(r)
            assert 0 <= a <= e <= len(raw)
    assert raised > 0 and body_start > 0


def test_partner_reads_auto_follows_the_cache_size(hashed, tmp_path):
    """"auto": whole shards when the cache holds the dataset (later epochs read locally),
    ranged rows when it cannot; a bad value names the argument."""
    size = sum(os.path.getsize(os.path.join(hashed.local, f)) for f in _shard_files(hashed.local))
    c = str(tmp_path / "c")
    assert not ReinforcedDataset(hashed.ds_url, cache_dir=c)._ranged_partners
    assert not ReinforcedDataset(hashed.ds_url, cache_dir=c, cache_limit=size)._ranged_partners
    small = ReinforcedDataset(hashed.ds_url, cache_dir=c, cache_limit=size // 2, predownload=0)
    assert small._ranged_partners
    small.partner_images([35])
    assert small.remote.stats["row_reads"] == 1 and hashed.full_gets("shard-00003.arrow") == 0
    whole = ReinforcedDataset(hashed.ds_url, cache_dir=str(tmp_path / "c2"), predownload=0)
    whole.partner_images([35])
    assert whole.remote.stats["row_reads"] == 0 and hashed.full_gets("shard-00003.arrow") == 1
    with pytest.raises(ValueError, match="partner_reads"):
        ReinforcedDataset(hashed.ds_url, cache_dir=c, partner_reads="rows")


# ------------------------------------------------------- durability without an fsync per shard
def _xattrs_here(path):
    try:
        os.setxattr(path, "user.fastload.probe", b"1")
        return True
    except OSError:
        return False


def test_downloads_are_marked_with_the_boot_not_fsynced(http, local_ds, tmp_path, monkeypatch):
    """A verified shard is renamed into place marked with this boot's id, without an fsync
    (the timeline measured 7-19 ms of wall per 2 MB shard for it)."""
    from fastload.remote import cachedir

    if cachedir._BOOT is None or not _xattrs_here(str(tmp_path)):
        pytest.skip("no boot id or no user xattrs here: downloads are fsync'd")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    ds = ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
    synced.clear()
    ds.gather(np.array([0, 15]), np.zeros(2, np.int64))
    assert ds.remote.stats["downloads"] == 2 and synced == []
    for p in (0, 1):
        assert os.getxattr(ds.remote.local_name(p), cachedir.XATTR) == cachedir._BOOT


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "torn"])
@pytest.mark.parametrize("mark", ["other_boot", "none"])
def test_a_shard_from_before_a_crash_is_hashed_again(http, local_ds, tmp_path, damaged, mark):
    """A shard marked by another boot (the machine crashed or rebooted since it was written
    without an fsync), or not marked at all (a cache from before the marks), is hashed again
    before it is used: intact, it is kept, fsync'd and marked durable (no download, no second
    hash later); torn (zeros where the disk never got the bytes), it is downloaded again and
    never served."""
    from fastload.remote import cachedir

    if cachedir._BOOT is None or not _xattrs_here(str(tmp_path)):
        pytest.skip("no boot id or no user xattrs here: downloads are fsync'd")
    c = str(tmp_path / "c")
    ds = ReinforcedDataset(http.ds_url, cache_dir=c, predownload=0)
    ds.gather(np.array([15]), np.zeros(1, np.int64))
    path = ds.remote.local_name(1)
    if mark == "none":
        os.removexattr(path, cachedir.XATTR)
    else:
        os.setxattr(path, cachedir.XATTR, b"00000000-0000-0000-0000-000000000000")
    if damaged:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\0" * (size - size // 2))
    want = _batches(ReinforcedDataset(local_ds), batch_size=10, shuffle=False)
    ds2 = ReinforcedDataset(http.ds_url, cache_dir=c, predownload=0)
    _same(_batches(ds2, batch_size=10, shuffle=False), want)
    assert ds2.remote.stats["downloads"] == (4 if damaged else 3)  # shard 1 again only when torn
    assert os.getxattr(path, cachedir.XATTR) == (cachedir._BOOT if damaged else cachedir.DURABLE)
    assert http.full_gets("shard-00001.arrow") == (2 if damaged else 1)


# ------------------------------------------------------- metadata of thousands of shards
@pytest.mark.slow
def test_opening_2000_shards_costs_a_few_gets(tmp_path):
    """A dataset of 2,000 shards opens from moto_server with 2 GETs (manifest.json and
    meta-index.ipc) instead of 2 ranged GETs per shard; a dataset written before the index
    (none listed) still opens, shard by shard, to the same metadata."""
    import json

    root = str(tmp_path / "d")
    write_dataset(root, n=2000, shard_size=1)
    log = str(tmp_path / "moto.log")
    m = Moto(log=log)
    try:
        with environment(m.env):
            url = m.upload(root, "many", "ds")
            before = len(m.requests("GET"))
            ds = ReinforcedDataset(url, cache_dir=str(tmp_path / "c"), predownload=0)
            gets = m.requests("GET")[before:]
            assert len(gets) <= 3, gets
            assert sorted(p.rsplit("/", 1)[-1] for p in gets) == ["manifest.json", "meta-index.ipc"]
            loc = ReinforcedDataset(root)
            assert ds.keys == loc.keys and np.array_equal(ds.labels, loc.labels)
            assert np.array_equal(ds.source_hw, loc.source_hw) and np.array_equal(ds._hash, loc._hash)
            # a second open reads the index from the cache: the manifest only
            before = len(m.requests("GET"))
            ReinforcedDataset(url, cache_dir=str(tmp_path / "c"), predownload=0)
            assert [p.rsplit("/", 1)[-1] for p in m.requests("GET")[before:]] == ["manifest.json"]
            # an older dataset (no index listed): per-shard ranged reads, the same arrays
            man = json.load(open(os.path.join(root, "manifest.json")))
            man.pop("meta_index")
            m.client().put_object(Bucket="many", Key="ds/manifest.json", Body=json.dumps(man).encode())
            before = len(m.requests("GET"))
            old = ReinforcedDataset(url, cache_dir=str(tmp_path / "c2"), predownload=0)
            assert len(m.requests("GET")) - before >= 2000
            assert old.keys == loc.keys and np.array_equal(old.labels, loc.labels)
    finally:
        m.stop()


def test_a_tampered_meta_index_is_refused(http, tmp_path):
    """meta-index.ipc is hashed against the manifest's sha256: changed labels on the server
    are a ChecksumError naming its URL, never metadata."""
    p = os.path.join(http.root, "ds", "meta-index.ipc")
    raw = bytearray(open(p, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(p, "wb").write(bytes(raw))
    with pytest.raises(remote.ChecksumError, match=r"/ds/meta-index\.ipc: downloaded .* sha256"):
        ReinforcedDataset(http.ds_url, cache_dir=str(tmp_path / "c"), predownload=0)
