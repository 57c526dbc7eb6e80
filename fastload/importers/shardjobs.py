"""Per-shard conversion shared by the importers (``import-mldr``, ``import-datacomp``).

The importing process streams its sources (sequential: decompression, tar parsing) and
stages each shard's raw members in a file under the output folder; once a shard's members
are all staged, the shard is converted and written by ``fn(job, s)``: inline (engine
``local``) or as a Ray task (engine ``ray``). Only the importing process adds finished
shards to the manifest, so an interrupted import resumes per shard with either engine, and
both engines write the same shards (the same function converts them).
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Dict, Optional

ENGINES = ("local", "ray")


class Shards:
    """Runs ``fn(job, s) -> shard entry`` here (``local``) or as Ray tasks (``ray``: a Ray
    started here with ``workers`` CPUs, or the one already initialized), adding each finished
    shard to ``writer`` from this process. ``on_done(entry)``, if given, sees each entry first."""

    def __init__(self, fn: Callable[[Any, int], Dict[str, Any]], job: Any, writer, engine: str,
                 workers: Optional[int], on_done: Optional[Callable[[Dict[str, Any]], None]] = None):
        checked_args(engine, 1)
        self.fn, self.writer, self.engine, self.job, self.on_done = fn, writer, engine, job, on_done
        self.pending: Dict[Any, int] = {}
        if engine == "ray":
            try:
                import ray
            except ImportError as e:
                raise ImportError("engine='ray' needs Ray installed (pip install ray)") from e
            if not ray.is_initialized():
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            self.ray, self.task, self.ref = ray, ray.remote(fn), ray.put(job)

    def _add(self, info: Dict[str, Any]) -> None:
        if self.on_done is not None:
            self.on_done(info)
        self.writer.add_shard(info)  # the shard file is already renamed into place

    def submit(self, s: int) -> None:
        if self.engine == "local":
            self._add(self.fn(self.job, s))
        else:
            self.pending[self.task.remote(self.ref, s)] = s

    def collect(self, block: bool) -> None:
        while self.pending:
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not done:
                return
            self.pending.pop(done[0])
            self._add(self.ray.get(done[0]))


# staged samples as named parts: id, part count, then per part len(name), len(data), name, data
_HEAD, _PART = struct.Struct("<QI"), struct.Struct("<HQ")


def stage_parts(path: str, i: int, parts: Dict[str, bytes]) -> None:
    """Append sample ``i`` (``{name: bytes}``) to the staging file ``path``."""
    out = [_HEAD.pack(i, len(parts))]
    for name, data in parts.items():
        nb = name.encode()
        out += [_PART.pack(len(nb), len(data)), nb, bytes(data)]
    with open(path, "ab") as f:
        f.write(b"".join(out))


def read_staged_parts(path: str) -> Dict[int, Dict[str, bytes]]:
    """id -> parts of every sample staged in ``path``."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = {}, 0
    while pos < len(data):
        i, n = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        parts = {}
        for _ in range(n):
            nn, nd = _PART.unpack_from(data, pos)
            pos += _PART.size
            name = data[pos:pos + nn].decode()
            pos += nn
            parts[name] = data[pos:pos + nd]
            pos += nd
        out[i] = parts
    return out


def add_engine_args(ap, streams: str) -> None:
    """``--engine`` and ``--workers`` of an importer's command line (``streams``: what this
    process reads sequentially while the Ray tasks convert)."""
    ap.add_argument("--engine", choices=ENGINES, default="local",
                    help=f"ray: decode, convert and write shards in Ray tasks (this process streams {streams})")
    ap.add_argument("--workers", type=int, default=None,
                    help="with --engine ray: CPUs of the Ray started here (default: all)")


def checked_args(engine: str, shard_size) -> int:
    """An importer's ``engine`` and ``shard_size`` checked (errors name them); the shard size."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be {' or '.join(map(repr, ENGINES))}, got {engine!r}")
    shard_size = int(shard_size)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return shard_size
