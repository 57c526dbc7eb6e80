"""obstore vs fsspec (s3fs) on the same moto_server (S3 protocol on 127.0.0.1), one run.

Why: fastload/format/remote.py talks to object storage through one client library; this
measures the two candidates on what the cache does (whole-object get, ranged get of the
small metadata columns, listing). Run it where both are installed; s3fs pins its own
botocore, so keep it out of fastload's environment, e.g.::

    python -m venv /work/venv-s3fs && /work/venv-s3fs/bin/pip install s3fs obstore numpy
    /work/venv-s3fs/bin/python benchmarks/remote_clients.py      # writes results/remote_clients.json
"""
import json, os, platform, socket, statistics, subprocess, sys, time, datetime
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    srv = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    try:
        import obstore as obs
        import s3fs
        from obstore.store import S3Store

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir("bench")
        store = S3Store("bench", endpoint=endpoint, client_options={"allow_http": True}, region="us-east-1")
        big = os.urandom(64 << 20)
        obs.put(store, "big.bin", big)
        for i in range(300):
            obs.put(store, f"many/{i:04d}", b"x" * 100)
        res = {}
        rep = 5

        def timeit(fn):
            ts = []
            for _ in range(rep):
                t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        # alternate the two clients so machine noise hits both alike
        t_obs = timeit(lambda: bytes(obs.get(store, "big.bin").bytes()))
        t_fs = timeit(lambda: fs.cat_file("bench/big.bin"))
        res["get_64MiB_MBps"] = {"obstore": 64 / t_obs * 1.048576, "s3fs": 64 / t_fs * 1.048576}
        offs = [(i * 997 * 4096) % ((64 << 20) - 65536) for i in range(200)]
        t_obs = timeit(lambda: [obs.get_range(store, "big.bin", start=o, end=o + 65536) for o in offs])
        t_fs = timeit(lambda: [fs.cat_file("bench/big.bin", start=o, end=o + 65536) for o in offs])
        res["ranged_get_64KiB_per_s"] = {"obstore": 200 / t_obs, "s3fs": 200 / t_fs}
        t_obs = timeit(lambda: [x for chunk in obs.list(store, "many/") for x in chunk])
        t_fs = timeit(lambda: (fs.invalidate_cache(), fs.ls("bench/many", detail=True)))
        res["list_300_objects_s"] = {"obstore": t_obs, "s3fs": t_fs}
        doc = {"benchmark": "remote_clients", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                                                          "loadavg": os.getloadavg(), "note": "2 shared cores, 8 engineers: noisy"},
               "versions": {"python": platform.python_version(), "obstore": obs.__version__, "s3fs": s3fs.__version__},
               "server": "moto_server on 127.0.0.1 (S3 REST API over HTTP)", "repeats": rep, "statistic": "median",
               "results": res}
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "remote_clients.json")
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
        print(json.dumps(res, indent=1))
    finally:
        srv.terminate(); srv.wait(10)


if __name__ == "__main__":
    main()
