"""Checkpoint tensors <-> the parameter tree, through a family's declarative name map.

A family maps every hub tensor name to a :class:`Target`: the param path, an index into that
param (one expert's gate or up half of the stacked weight) and whether the stored tensor is
the transpose of that slot. The same map serves loading (checked in full before any data is
read: missing, unexpected and mis-shaped tensors are reported together) and saving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moelab.checkpoints.safetensors_io import CheckpointError, TensorEntry, read_tensor
from moelab.models import tree

log = logging.getLogger("moelab")


@dataclass(frozen=True)
class Target:
    path: tree.Path
    index: tuple = ()
    transposed: bool = False  # stored as the transpose of the slot's last two dims

    def slot(self, params: dict) -> torch.Tensor:
        t = tree.get(params, self.path)
        return t[self.index] if self.index else t

    def stored_shape(self, params: dict) -> tuple[int, ...]:
        shape = tuple(self.slot(params).shape)
        return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape


def check_entries(
    entries: dict[str, TensorEntry],
    targets: dict[str, Target],
    meta_params: dict,
    ignored: Callable[[str], bool],
) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    missing = sorted(n for n in targets if n not in entries)
    unexpected = sorted(n for n in entries if n not in targets and not ignored(n))
    mismatched = sorted(
        f"{n}: stored {list(entries[n].shape)}, expected {list(t.stored_shape(meta_params))}"
        for n, t in targets.items()
        if n in entries and tuple(entries[n].shape) != t.stored_shape(meta_params)
    )
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if items:
            shown = "; ".join(items[:20]) + (
                f"; ... ({len(items) - 20} more)" if len(items) > 20 else ""
            )
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))


def load_into(
    params: dict,
    entries: dict[str, TensorEntry],
    targets: dict[str, Target],
    progress: Callable[[Iterator], Iterator] = iter,
) -> None:
    """Read every target's tensor, one at a time, into its slot of the allocated params."""
    for name in progress(sorted(targets, key=lambda n: (entries[n].file, entries[n].start))):
        target = targets[name]
        slot = target.slot(params)
        value = read_tensor(entries[name])
        if target.transposed:
            value = value.transpose(-1, -2)
        if not value.is_floating_point():
            raise CheckpointError(f"{name}: stored as {value.dtype}, expected a float tensor")
        slot.copy_(value)  # casts to the param's dtype and moves to its device
        del value


def saved_tensors(params: dict, targets: dict[str, Target]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hub name, tensor)`` for every target, in name order (the inverse of loading)."""
    for name in sorted(targets):
        target = targets[name]
        value = target.slot(params)
        yield name, value.transpose(-1, -2) if target.transposed else value
