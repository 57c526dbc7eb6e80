"""fastload vs MosaicML Streaming and LitData reading the same JPEGs from the same S3 server,
side by side in one run.

All read from one moto_server on 127.0.0.1, cold caches then warm (new processes on the
caches the cold run filled), 2 ranks as separate processes, batch 64 per rank, 160 px:

- fastload: ReinforcedLoader over the reinforced dataset (stored RandomResizedCrop + flip,
  replayed by the C++ kernel), BlockShuffleSampler(partitions=2) + predownload;
- MosaicML Streaming (mosaicml-streaming, its own venv: it needs another torch): MDS shards
  of the same JPEGs, StreamingDataset(shuffle=True) + torchvision RandomResizedCrop(160) +
  flip + ToTensor + Normalize, DataLoader(num_workers=1).
- LitData (litdata, same venv as Streaming): chunks of ~2.5 MB of the same JPEG bytes written
  by ``litdata.optimize``, ``StreamingDataset("s3://...", shuffle=True)`` with the endpoint in
  ``storage_options``, the same torchvision transform, ``StreamingDataLoader(num_workers=1)``;
  its ranks see a world of 2 through a gloo process group, each with its own cache folder.

Egress per rank per epoch: fastload's counted bytes (separate caches); Streaming's ranks must
share one local folder on one host (as two "nodes" they collide in /dev/shm), so its egress
per rank is that folder's size after the epoch / 2.

    python benchmarks/remote_peers.py --peer-python /tmp/fl-peers/bin/python   # -> results/remote_peers.json

The peers' venv: ``python -m venv V && V/bin/pip install mosaicml-streaming litdata torchvision``
(they need another torch than the project's). Each mode records the 1-minute load average;
images/s and images per CPU-second (loader processes and their workers) are both reported.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

B, IMAGE = 64, 160

# One epoch of a peer's DataLoader ``dl``, timed the same way for every peer (wall and CPU of
# the process and its workers; the cache's bytes on disk), printed as one JSON line
TIMED_EPOCH = r"""
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
n, c0, t0 = 0, cpu(), time.perf_counter()
for x, y in dl:
    n += x.shape[0]
t, c = time.perf_counter() - t0, cpu() - c0
size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(local) for f in fs)
print(json.dumps({"images": n, "epoch_s": t, "cpu_s": c, "bytes_in_cache": size}), flush=True)
"""

MDS_WRITE = r"""
import os, sys
from streaming import MDSWriter
src, out = sys.argv[1], sys.argv[2]
classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
with MDSWriter(out=out, columns={"image": "bytes", "label": "int"}, size_limit=2_500_000) as w:
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(src, name))):
            with open(os.path.join(src, name, f), "rb") as fh:
                w.write({"image": fh.read(), "label": c})
"""

MDS_READ = r"""
import io, json, os, resource, sys, time
import torch
from PIL import Image
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from torchvision import transforms as T
remote, local, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[5])  # Streaming inits gloo itself
tf = T.Compose([T.RandomResizedCrop(%d), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
class DS(StreamingDataset):
    def __getitem__(self, i):
        s = super().__getitem__(i)
        return tf(Image.open(io.BytesIO(s["image"])).convert("RGB")), s["label"]
ds = DS(remote=remote, local=local, shuffle=True, shuffle_seed=0, batch_size=%d)
dl = DataLoader(ds, batch_size=%d, num_workers=1)
""" % (IMAGE, B, B) + TIMED_EPOCH


LIT_WRITE = r"""
import os, sys
from litdata import optimize
src, out = sys.argv[1], sys.argv[2]
classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
items = [(os.path.join(src, name, f), c) for c, name in enumerate(classes)
         for f in sorted(os.listdir(os.path.join(src, name)))]
def one(item):
    with open(item[0], "rb") as fh:
        return {"image": fh.read(), "label": item[1]}
if __name__ == "__main__":
    optimize(fn=one, inputs=items, output_dir=out, chunk_bytes="2.5MB", num_workers=1)
"""

LIT_READ = r"""
import io, json, os, resource, sys, time
import torch
import torch.distributed as dist
from PIL import Image
from litdata import StreamingDataLoader, StreamingDataset
import litdata.streaming.downloader as D
from torchvision import transforms as T
# LitData builds its obstore S3Store with client options of its own, which drop the
# environment's AWS_ALLOW_HTTP: the local endpoint is plain http
D._OBSTORE_CLIENT_OPTIONS = {**D._OBSTORE_CLIENT_OPTIONS, "allow_http": True}
remote, local, rank, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
tf = T.Compose([T.RandomResizedCrop(%d), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
class DS(StreamingDataset):
    def __getitem__(self, i):
        s = super().__getitem__(i)
        return tf(Image.open(io.BytesIO(s["image"])).convert("RGB")), s["label"]
opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
ds = DS(remote, cache_dir=local, shuffle=True, seed=0, storage_options=opts)
dl = StreamingDataLoader(ds, batch_size=%d, num_workers=1)
""" % (IMAGE, B) + TIMED_EPOCH + "dist.destroy_process_group()\n"


def run_pair(cmds, env):
    load = os.getloadavg()[0]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=1200)
        if p.returncode:
            raise RuntimeError(e[-3000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return {"load_average_1m": load, "images_per_s": sum(o["images"] for o in outs) / max(o["epoch_s"] for o in outs),
            "images_per_cpu_s": sum(o["images"] for o in outs) / sum(o["cpu_s"] for o in outs), "ranks": outs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fastload_remote_bench"))
    a = ap.parse_args()
    from _remote_servers import Moto
    from fastload.bench._common import write_result
    import remote as fl_bench  # benchmarks/remote.py: same dataset build and fastload worker

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    local = fl_bench.build(a.images, a.work)
    jpegs = os.path.join(a.work, f"jpeg-{a.images}")
    mds = os.path.join(a.work, f"mds-{a.images}")
    if not os.path.exists(os.path.join(mds, "index.json")):
        shutil.rmtree(mds, ignore_errors=True)
        subprocess.run([a.peer_python, "-c", MDS_WRITE, jpegs, mds], check=True)
    lit = os.path.join(a.work, f"litdata-{a.images}")
    if not os.path.exists(os.path.join(lit, "index.json")):
        shutil.rmtree(lit, ignore_errors=True)
        script = os.path.join(a.work, "lit_write.py")  # optimize() spawns workers: a file, not -c
        with open(script, "w") as f:
            f.write(LIT_WRITE)
        subprocess.run([a.peer_python, script, jpegs, lit], check=True, cwd=a.work)
    moto = Moto()
    try:
        fl_url = moto.upload(local, "bench", "reinforced")
        mds_url = moto.upload(mds, "bench", "mds")
        lit_url = moto.upload(lit, "bench", "litdata")
        env = dict(os.environ, **moto.env, S3_ENDPOINT_URL=moto.endpoint, DISABLE_S5CMD="1")
        rounds = []
        for k in range(a.rounds):
            from _remote_servers import free_port

            caches = [tempfile.mkdtemp(prefix=f"peer{k}r{r}-", dir=a.work) for r in range(2)]
            fl_cmd = [[sys.executable, os.path.join(HERE, "remote.py"), "--worker", fl_url, caches[r], str(r), "2"]
                      for r in range(2)]
            mcaches = [tempfile.mkdtemp(prefix=f"mds{k}r{r}-", dir=a.work) for r in range(2)]
            lcaches = [tempfile.mkdtemp(prefix=f"lit{k}r{r}-", dir=a.work) for r in range(2)]

            def ms_cmd():
                port = str(free_port())
                # Streaming's ranks on one host must be one node sharing one local folder (as
                # "two nodes" they collide in /dev/shm): its egress per rank is that folder's size / 2
                return [[a.peer_python, "-c", MDS_READ, mds_url, mcaches[0], str(r), "2", port] for r in range(2)]

            def lit_cmd():
                port = str(free_port())
                return [[a.peer_python, "-c", LIT_READ, lit_url, lcaches[r], str(r), "2", port] for r in range(2)]

            row = {}
            for temp in ("cold", "warm"):  # warm: new processes on the caches the cold run filled
                row[f"fastload_s3_{temp}"] = run_pair(fl_cmd, env)
                row[f"mosaicml_streaming_s3_{temp}"] = ms = run_pair(ms_cmd(), env)
                for o in ms["ranks"]:
                    o["egress_per_rank"] = o["bytes_in_cache"] / 2
                row[f"litdata_s3_{temp}"] = run_pair(lit_cmd(), env)
                for peer in ("mosaicml_streaming", "litdata"):
                    base, other = row[f"fastload_s3_{temp}"], row[f"{peer}_s3_{temp}"]
                    row[f"ratio_vs_{peer}_{temp}"] = {
                        "images_per_s": base["images_per_s"] / other["images_per_s"],
                        "images_per_cpu_s": base["images_per_cpu_s"] / other["images_per_cpu_s"]}
            for c in caches + mcaches + lcaches:
                shutil.rmtree(c, ignore_errors=True)
            rounds.append(row)
            print(f"round {k}: " + "; ".join(
                f"{temp}: fastload {row[f'fastload_s3_{temp}']['images_per_s']:.0f}, Streaming "
                f"{row[f'mosaicml_streaming_s3_{temp}']['images_per_s']:.0f}, LitData "
                f"{row[f'litdata_s3_{temp}']['images_per_s']:.0f} img/s" for temp in ("cold", "warm")), flush=True)
        ver = subprocess.run([a.peer_python, "-c", "import streaming, litdata, torch, torchvision; "
                              "print(streaming.__version__, litdata.__version__, torch.__version__, "
                              "torchvision.__version__)"], capture_output=True, text=True).stdout.split()
        import statistics

        summary = {}
        for mode in ("fastload", "mosaicml_streaming", "litdata"):
            for temp in ("cold", "warm"):
                for m in ("images_per_s", "images_per_cpu_s"):
                    v = [r[f"{mode}_s3_{temp}"][m] for r in rounds]
                    summary[f"{mode}_{temp}_{m}"] = {"median": statistics.median(v), "range": [min(v), max(v)]}
        for peer in ("mosaicml_streaming", "litdata"):
            for temp in ("cold", "warm"):
                for m in ("images_per_s", "images_per_cpu_s"):
                    v = [r[f"ratio_vs_{peer}_{temp}"][m] for r in rounds]
                    summary[f"fastload_vs_{peer}_{temp}_{m}"] = {"median": statistics.median(v), "range": [min(v), max(v)]}
        print(json.dumps(summary, indent=1))
        path = write_result("remote_peers", {
            "setup": {"images": a.images, "rounds": a.rounds, "batch_per_rank": B, "ranks": 2, "image_size": IMAGE,
                      "server": "moto_server on 127.0.0.1, same 2 cores", "caches": "cold (empty), then warm (new processes on the filled caches); fastload and LitData one per rank",
                      "fastload": "ReinforcedLoader, stored RRC+flip replayed, BlockShuffleSampler(partitions=2)",
                      "mosaicml_streaming": "StreamingDataset(shuffle=True) + torchvision RRC/flip/ToTensor/Normalize, "
                                            "DataLoader(num_workers=1), MDS shards of ~2.5 MB, 2 local ranks of one node sharing "
                                            "one local folder (its shared-memory design needs that on one host)",
                      "litdata": "litdata.optimize chunks of ~2.5 MB (the same JPEG bytes), StreamingDataset(s3://, "
                                 "shuffle=True, storage_options endpoint) + the same torchvision transform, "
                                 "StreamingDataLoader(num_workers=1), one cache folder per rank, world of 2 via gloo"},
            "peer_versions": dict(zip(["mosaicml-streaming", "litdata", "torch", "torchvision"], ver)),
            "note": "2 shared cores, other work running: noisy; ratios within a round",
            "load_average": os.getloadavg(), "rounds": rounds,
            "summary": summary})
        print(path)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
