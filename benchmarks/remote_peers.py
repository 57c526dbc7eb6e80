"""fastload vs MosaicML Streaming reading the same JPEGs from the same S3 server, one run.

Both read from one moto_server on 127.0.0.1 with cold caches, 2 ranks as separate processes,
each with its own cache, batch 64 per rank, 160 px:

- fastload: ReinforcedLoader over the reinforced dataset (stored RandomResizedCrop + flip,
  replayed by the C++ kernel), BlockShuffleSampler(partitions=2) + predownload;
- MosaicML Streaming (mosaicml-streaming, its own venv: it needs another torch): MDS shards
  of the same JPEGs, StreamingDataset(shuffle=True) + torchvision RandomResizedCrop(160) +
  flip + ToTensor + Normalize, DataLoader(num_workers=1).

Egress per rank per epoch: fastload's counted bytes (separate caches); Streaming's ranks must
share one local folder on one host (as two "nodes" they collide in /dev/shm), so its egress
per rank is that folder's size after the epoch / 2.

    python benchmarks/remote_peers.py --peer-python /work/venv-mds/bin/python   # -> results/remote_peers.json
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
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
n, c0, t0 = 0, cpu(), time.perf_counter()
for x, y in dl:
    n += x.shape[0]
t, c = time.perf_counter() - t0, cpu() - c0
size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(local) for f in fs)
print(json.dumps({"images": n, "epoch_s": t, "cpu_s": c, "bytes_in_cache": size}))
""" % (IMAGE, B, B)


def run_pair(cmds, env):
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=1200)
        if p.returncode:
            raise RuntimeError(e[-3000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return {"images_per_s": sum(o["images"] for o in outs) / max(o["epoch_s"] for o in outs),
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
    moto = Moto()
    try:
        fl_url = moto.upload(local, "bench", "reinforced")
        mds_url = moto.upload(mds, "bench", "mds")
        env = dict(os.environ, **moto.env, S3_ENDPOINT_URL=moto.endpoint)
        rounds = []
        for k in range(a.rounds):
            caches = [tempfile.mkdtemp(prefix=f"peer{k}r{r}-", dir=a.work) for r in range(2)]
            fl = run_pair([[sys.executable, os.path.join(HERE, "remote.py"), "--worker", fl_url, caches[r], str(r), "2"]
                           for r in range(2)], env)
            mcaches = [tempfile.mkdtemp(prefix=f"mds{k}r{r}-", dir=a.work) for r in range(2)]
            from _remote_servers import free_port

            port = str(free_port())
            # Streaming's ranks on one host must be one node sharing one local folder (as "two
            # nodes" they collide in /dev/shm): its egress per rank is that folder's size / 2
            ms = run_pair([[a.peer_python, "-c", MDS_READ, mds_url, mcaches[0], str(r), "2", port] for r in range(2)],
                          env)
            for o in ms["ranks"]:
                o["egress_per_rank"] = o["bytes_in_cache"] / 2
            for c in caches + mcaches:
                shutil.rmtree(c, ignore_errors=True)
            row = {"fastload_s3_cold": fl, "mosaicml_streaming_s3_cold": ms,
                   "ratio_images_per_s": fl["images_per_s"] / ms["images_per_s"],
                   "ratio_images_per_cpu_s": fl["images_per_cpu_s"] / ms["images_per_cpu_s"]}
            rounds.append(row)
            print(f"round {k}: fastload {fl['images_per_s']:.0f} img/s, Streaming {ms['images_per_s']:.0f} img/s "
                  f"({row['ratio_images_per_s']:.2f}x; per CPU-s {row['ratio_images_per_cpu_s']:.2f}x)", flush=True)
        ver = subprocess.run([a.peer_python, "-c", "import streaming, torch, torchvision; "
                              "print(streaming.__version__, torch.__version__, torchvision.__version__)"],
                             capture_output=True, text=True).stdout.split()
        path = write_result("remote_peers", {
            "setup": {"images": a.images, "batch_per_rank": B, "ranks": 2, "image_size": IMAGE,
                      "server": "moto_server on 127.0.0.1, same 2 cores", "caches": "cold, one per rank",
                      "fastload": "ReinforcedLoader, stored RRC+flip replayed, BlockShuffleSampler(partitions=2)",
                      "mosaicml_streaming": "StreamingDataset(shuffle=True) + torchvision RRC/flip/ToTensor/Normalize, "
                                            "DataLoader(num_workers=1), MDS shards of ~2.5 MB, 2 local ranks of one node sharing "
                                            "one local folder (its shared-memory design needs that on one host)"},
            "peer_versions": dict(zip(["mosaicml-streaming", "torch", "torchvision"], ver)),
            "note": "2 shared cores, other work running: noisy; ratios within a round",
            "load_average": os.getloadavg(), "rounds": rounds})
        print(path)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
