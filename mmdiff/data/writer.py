"""Writing webdataset shards: deterministic, atomically written tars of samples ``{"__key__", ext: bytes}``.

Used by every producer of shards (the shapes generator, folder conversion, precomputed latents).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

from mmdiff.data.shards import is_unsafe_member_name


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so that the same samples give byte-identical tars on every run and machine.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar_shard(path: str | os.PathLike, samples: list[dict[str, Any]]) -> None:
    """Write samples ``{"__key__": str, ext: bytes, ...}`` as one deterministic webdataset tar, atomically.

    A key that would make a member escape the folder the tar is extracted to (absolute, ``..``) is refused.
    """
    for sample in samples:
        if is_unsafe_member_name(str(sample["__key__"])):
            raise ValueError(f"refusing sample key {sample['__key__']!r}: it would escape the extraction folder")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                _tar_member(tar, f"{key}.{ext}", sample[ext])
    os.replace(tmp, path)


class ShardSink:
    """Collects samples and writes ``shard-000000.tar``, ``shard-000001.tar``, ... of ``shard_size`` samples each."""

    def __init__(self, out_dir: str | os.PathLike, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        # Shards left by an earlier, larger run would otherwise be picked up by folder expansion as extra data.
        for stale in self.out_dir.glob("shard-*.tar"):
            stale.unlink()
        self.pending: list[dict[str, Any]] = []
        self.shards: list[str] = []
        self.count = 0

    def add(self, sample: dict[str, Any]) -> None:
        self.pending.append(sample)
        self.count += 1
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f"shard-{len(self.shards):06d}.tar"
        write_tar_shard(path, self.pending)
        self.shards.append(str(path))
        self.pending = []
