"""The parameter tree: nested dicts and lists of tensors, addressed by paths.

A path is a tuple of dict keys and list indices, e.g. ``("layers", 3, "mlp", "experts",
"gate_up")``; its dotted form (``layers.3.mlp.experts.gate_up``) is what predicates and logs see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Path = tuple[Any, ...]


def leaves(tree: Any, prefix: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in the tree, in a fixed order."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from leaves(value, (*prefix, i))
    elif isinstance(tree, torch.Tensor):
        yield prefix, tree


def get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def map_leaves(fn: Callable[[Path, torch.Tensor], Any], tree: Any, prefix: Path = ()) -> Any:
    """A tree of the same structure with ``fn(path, tensor)`` at every tensor."""
    if isinstance(tree, dict):
        return {k: map_leaves(fn, v, (*prefix, k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [map_leaves(fn, v, (*prefix, i)) for i, v in enumerate(tree)]
    if isinstance(tree, torch.Tensor):
        return fn(prefix, tree)
    return tree


def dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def count(tree: Any, predicate: Callable[[Path, torch.Tensor], bool] = lambda p, t: True) -> int:
    return sum(t.numel() for p, t in leaves(tree) if predicate(p, t))
