"""safetensors files, read tensor by tensor and written atomically.

Reading parses the header itself and reads each tensor with plain file reads into a buffer of
its own, so loading holds the parameters plus one tensor, never a mapping of the whole file
(mapped pages count toward resident memory). Every header is checked against the file size
before any data is used: a truncated or corrupt file is refused up front.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.files import UMASK, fsync_folder

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # as Transformers names them
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: missing, corrupt or not matching."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Entries of one safetensors file, checked against its size and its own shapes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing checkpoint file {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from e
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: {name!r} has {end - begin} bytes for shape {shape}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated ({name!r} ends at byte {base + end}, file has {size})"
            )
        entries[name] = TensorEntry(path, dtype, shape, base + begin, nbytes)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor's bytes read into a fresh CPU tensor of its stored dtype and shape."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(buf.numpy()) if entry.nbytes else 0
    if got != entry.nbytes:
        raise CheckpointError(f"{entry.file}: short read ({got} of {entry.nbytes} bytes)")
    return buf.view(entry.dtype).view(entry.shape)


def checkpoint_entries(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint folder: one file or shards listed by the index (the file
    wins where both are present, as in Transformers)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    index = _shard_index(root)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).exists()]
        if missing:
            raise CheckpointError(f"{root}: shards listed in {INDEX_FILE} are missing: {missing}")
        entries = {}
        for shard in shards:
            entries.update(read_header(root / shard))
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise CheckpointError(f"{root}: tensors listed in the index are absent: {absent[:8]}")
        return entries
    single = root / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{root} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    return read_header(single)


def _shard_index(root: Path) -> Path | None:
    """The shard index a load reads: none where a single file stands beside it (the file wins,
    as in Transformers)."""
    index = root / INDEX_FILE
    return index if index.exists() and not (root / SINGLE_FILE).exists() else None


def stored_dtype(path: str | os.PathLike, entries: dict[str, TensorEntry]) -> torch.dtype | None:
    """The dtype Transformers' ``dtype="auto"`` reads off a checkpoint whose config names none.

    A shard index's ``metadata.dtype`` where one is read, else the first floating-point tensor,
    by name, of the first file (shard names sorted; FP8 skipped, as Transformers cannot make a
    model of it); None where no tensor is floating point.
    """
    index = _shard_index(Path(path))
    if index is not None:
        named = (json.loads(index.read_text()).get("metadata") or {}).get("dtype")
        if named is not None:
            dtype = getattr(torch, str(named).removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{index}: metadata names an unknown dtype {named!r}")
            return dtype
    if not entries:
        return None
    first = min(e.file for e in entries.values())
    for name in sorted(n for n, e in entries.items() if e.file == first):
        dtype = entries[name].dtype
        if dtype.is_floating_point and dtype.itemsize > 1:
            return dtype
    return None


def write_checkpoint(
    path: str | os.PathLike,
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``config.json`` and the tensors (sharded past ``max_shard_bytes``) atomically.

    Everything goes to a temporary sibling folder first; only a complete checkpoint replaces
    ``path``, by rename, so a failure leaves any checkpoint already there untouched. The other
    files of a folder already at ``path`` (tokenizer, generation config, ...) are copied into
    the new one: only ``config.json`` and the safetensors weights are replaced.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: nothing was written")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it 0700; the folder is the checkpoint
        if target.exists():
            copy_kept_files(target, tmp, _replaced_by_a_save)
        # each shard is written as soon as it is full, so at most one shard is held on the CPU
        shard_maps: list[dict[str, int]] = []
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and current_bytes + nbytes > max_shard_bytes:
                _write_shard(tmp, current, shard_maps)
                current, current_bytes = {}, 0
            current[name] = t.detach().contiguous().cpu()
            current_bytes += nbytes
        _write_shard(tmp, current, shard_maps)
        if len(shard_maps) == 1:
            os.replace(tmp / "shard-0", tmp / SINGLE_FILE)
        else:
            weight_map, total = {}, 0
            for i, sizes in enumerate(shard_maps):
                file = f"model-{i + 1:05d}-of-{len(shard_maps):05d}.safetensors"
                os.replace(tmp / f"shard-{i}", tmp / file)
                weight_map.update({name: file for name in sizes})
                total += sum(sizes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replaced_by_a_save(name: str) -> bool:
    # NOTE: the weights' names only, as Transformers: other .safetensors files (a PEFT adapter
    # beside the model) are kept
    return name in ("config.json", SINGLE_FILE, INDEX_FILE) or bool(SHARD_FILE.fullmatch(name))


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem has them: a hub folder's other files can be large (GPT-OSS
    ships its weights again under ``original/``), and the old folder is dropped after the swap."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def copy_kept_files(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Link (or copy) into ``new`` every entry of ``old`` a save does not replace."""
    for entry in old.iterdir():
        if replaced(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _write_shard(folder: Path, tensors: dict, shard_maps: list[dict[str, int]]) -> None:
    file = folder / f"shard-{len(shard_maps)}"
    save_file(tensors, str(file), metadata={"format": "pt"})
    os.chmod(file, 0o666 & ~UMASK)  # safetensors writes 0600: others could not read the weights
    shard_maps.append({n: t.numel() * t.element_size() for n, t in tensors.items()})


def replace_folder(new: Path, target: Path) -> None:
    """Make the complete folder ``new`` be ``target`` by renames; an old ``target`` is dropped
    once ``new`` is in its place (and put back if that rename fails)."""
    for file in new.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, old / "previous")
        except BaseException:
            with contextlib.suppress(OSError):
                old.rmdir()  # only while empty: never drops the old folder itself
            raise
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old / "previous", target)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_folder(target.parent)
