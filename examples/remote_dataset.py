"""A reinforced dataset in S3, read through fastload's local shard cache.

``python examples/remote_dataset.py s3://bucket/prefix [CACHE_DIR]`` trains over a dataset
already in a bucket (credentials and endpoint from the usual AWS_* variables). With no URL,
the example writes a tiny dataset, starts ``moto_server`` (pip install "moto[server]" boto3)
on 127.0.0.1, uploads it, and reads it back from there."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import fastload
from fastload.batch.shuffle import BlockShuffleSampler


def train_one_epoch(url: str, cache_dir: str) -> int:
    ds = fastload.ReinforcedDataset(url, cache_dir=cache_dir, cache_limit=2**30, predownload=4)
    sampler = BlockShuffleSampler(ds, block_shards=4, seed=0)
    # the batch sampler hands the cache this rank's shard order: predownload ahead, evict behind
    loader = fastload.ReinforcedLoader(ds, batch_sampler=sampler.batch_sampler(8, dataset=ds), image_size=64)
    n = sum(batch[0].shape[0] for batch in loader)
    print(f"{n} images from {url}; downloaded {ds.remote.stats['downloads']} shards "
          f"({ds.remote.stats['bytes_downloaded']} bytes) into {ds.remote.dir}")
    return n


def _local_s3(work: str) -> tuple:
    import boto3
    from fastload.datasets import build_images, list_images, policy, tiny_teacher

    images = build_images(os.path.join(work, "jpeg"), n=24, progress=False)
    ds_dir = os.path.join(work, "ds")
    fastload.reinforce(images, tiny_teacher(len(list_images(images)[2])), ds_dir, num_augmentations=2, topk=3,
                       policy=policy("crop"), image_size=64, shard_size=8, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="demo")
    for f in os.listdir(ds_dir):
        s3.upload_file(os.path.join(ds_dir, f), "demo", f"tiny/{f}")
    return "s3://demo/tiny", srv


def main(argv) -> int:
    srv = None
    with tempfile.TemporaryDirectory(prefix="fastload_remote_example_") as work:  # removed afterwards
        try:
            if argv:
                url = argv[0]
            else:
                url, srv = _local_s3(work)
            return train_one_epoch(url, argv[1] if len(argv) > 1 else os.path.join(work, "cache"))
        finally:
            if srv is not None:
                srv.terminate()
                srv.wait(10)


if __name__ == "__main__":
    main(sys.argv[1:])
