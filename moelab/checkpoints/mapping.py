"""Checkpoint tensors <-> the parameter tree, through a family's declarative name map.

A family maps every hub tensor name to a :class:`Target`: the param path, an index into that
param (one expert's gate or up half of the stacked weight), and the small named transforms of
the stored form (transposed, gate/up interleaved, MXFP4 blocks + scales). The same map serves
loading (checked in full before any data is read: missing, unexpected and mis-shaped tensors
are reported together) and saving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moelab.checkpoints import mxfp4
from moelab.checkpoints.safetensors_io import CheckpointError, TensorEntry, read_tensor
from moelab.models import tree


@dataclass(frozen=True)
class Target:
    """Where one hub tensor lives in the params, and how it is stored.

    Attributes:
        path: the param's path.
        index: an index into the param (e.g. one expert's gate rows of the stacked weight).
        transposed: stored as the transpose of the slot's last two dims.
        interleaved_dim: gate and up alternate along this dim on disk (GPT-OSS); the params
            hold them as two halves, gate first.
        mxfp4_scales: the stored tensor is MXFP4 blocks, with their exponents under this name.
    """

    path: tree.Path
    index: tuple = ()
    transposed: bool = False
    interleaved_dim: int | None = None
    mxfp4_scales: str | None = None

    def slot(self, params: dict) -> torch.Tensor:
        t = tree.get(params, self.path)
        return t[self.index] if self.index else t

    def stored_shapes(self, name: str, params: dict) -> dict[str, tuple[int, ...]]:
        """Every stored tensor this target reads, with the shape it must have."""
        shape = tuple(self.slot(params).shape)
        if self.transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        if self.mxfp4_scales is None:
            return {name: shape}
        groups = (*shape[:-1], shape[-1] // mxfp4.GROUP)
        return {name: (*groups, mxfp4.GROUP // 2), self.mxfp4_scales: groups}

    def read(
        self, name: str, entries: dict[str, TensorEntry], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The stored tensor(s) turned into the slot's layout, on the CPU (MXFP4 dequantised
        into ``dtype`` one leading slice at a time, so the fp32 temporaries stay small)."""
        value = read_tensor(entries[name])
        if self.mxfp4_scales is not None:
            scales = read_tensor(entries[self.mxfp4_scales])
            out = torch.empty((*scales.shape[:-1], scales.shape[-1] * mxfp4.GROUP), dtype=dtype)
            for i in range(out.shape[0]):
                out[i] = mxfp4.dequantize(value[i], scales[i], dtype)
            value = out
        if self.transposed:
            value = value.transpose(-1, -2)
        if self.interleaved_dim is not None:
            dim = self.interleaved_dim % value.dim()
            pairs = value.unflatten(dim, (-1, 2))
            value = torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim)
        return value

    def write(self, name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The inverse of :meth:`read`: the tensor(s) to store for the slot's ``value``."""
        if self.interleaved_dim is not None:
            dim = self.interleaved_dim % value.dim()
            gate, up = value.chunk(2, dim=dim)
            value = torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)
        if self.transposed:
            value = value.transpose(-1, -2)
        if self.mxfp4_scales is None:
            return [(name, value)]
        try:
            blocks, scales = mxfp4.quantize(value.contiguous())
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        return [(name, blocks), (self.mxfp4_scales, scales)]


def check_entries(
    entries: dict[str, TensorEntry],
    targets: dict[str, Target],
    meta_params: dict,
    ignored: Callable[[str], bool],
) -> None:
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped or mis-typed
    tensor."""
    fp8 = sorted(
        n for n, e in entries.items() if e.dtype.is_floating_point and e.dtype.itemsize == 1
    )
    if fp8:  # one message, not one line per tensor: the whole checkpoint is in a format we lack
        raise CheckpointError(
            f"{len(fp8)} tensors are stored as FP8 (e.g. {fp8[0]}): moelab does not read FP8 "
            "checkpoints (their block scales); dequantise them to bf16 first"
        )
    expected, quantized = {}, set()
    for name, target in targets.items():
        expected.update(target.stored_shapes(name, meta_params))
        if target.mxfp4_scales is not None:
            quantized.update((name, target.mxfp4_scales))
    missing = sorted(n for n in expected if n not in entries)
    unexpected = sorted(n for n in entries if n not in expected and not ignored(n))
    mismatched = sorted(
        f"{n}: stored {list(entries[n].shape)}, expected {list(shape)}"
        for n, shape in expected.items()
        if n in entries and tuple(entries[n].shape) != shape
    )
    mistyped = sorted(
        f"{n}: stored {str(entries[n].dtype).removeprefix('torch.')}, expected {wanted}"
        for n in expected
        if n in entries
        for wanted in [_expected_dtype(n in quantized, entries[n].dtype)]
        if wanted is not None
    )
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
        ("wrong dtype", mistyped),
    ):
        if items:
            shown = "; ".join(items[:20]) + (
                f"; ... ({len(items) - 20} more)" if len(items) > 20 else ""
            )
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))


_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _expected_dtype(quantized: bool, stored: torch.dtype) -> str | None:
    """What a tensor should be stored as where ``stored`` is wrong, else None."""
    if quantized:
        return None if stored == torch.uint8 else "uint8 (MXFP4 blocks and scales)"
    return None if stored in _FLOATS else "bf16, fp16 or fp32"


def load_into(
    params: dict,
    entries: dict[str, TensorEntry],
    targets: dict[str, Target],
    progress: Callable[[Iterator], Iterator] = iter,
) -> None:
    """Read every target's tensor, one at a time, into its slot of the allocated params."""
    for name in progress(sorted(targets, key=lambda n: (entries[n].file, entries[n].start))):
        target = targets[name]
        with torch.no_grad():
            slot = target.slot(params)
            slot.copy_(target.read(name, entries, slot.dtype))  # casts, moves to the device


def saved_tensors(params: dict, targets: dict[str, Target]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hub name, tensor)`` for every stored tensor, in name order (the inverse of loading)."""
    for name in sorted(targets):
        yield from targets[name].write(name, targets[name].slot(params).detach())
