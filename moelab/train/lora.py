"""LoRA on a parameter tree: add adapters, choose what trains, merge, export and import.

Adapters live in the params as data: a dense linear ``{"weight", ...}`` gains ``lora_a [r, in]``
and ``lora_b [out, r]``; an experts dict gains ``lora`` (fused or separate gate/up, see
:func:`moelab.ops.lora.expert_lora_from_params`). A = Kaiming-uniform, B = 0, as PEFT, so training
starts at the base model.

Export writes PEFT's layout for Transformers v5 models (``adapter_model.safetensors`` +
``adapter_config.json``): dense adapters under ``<module>.lora_A/B.weight``; stacked experts as
``target_parameters`` (gate_up wrapped first, so its keys sit under ``experts.base_layer``),
with A ``[E*r, in]`` expert-major and B ``[out, r*E]`` rank-major; a trained router under
``modules_to_save``. Separate gate/up adapters export as one rank-2r adapter with a
block-diagonal B (the same function); see :func:`save_adapter` for the rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.checkpoints.safetensors_io import (
    CheckpointError,
    copy_kept_files,
    read_header,
    read_tensor,
    replace_folder,
)
from moelab.files import UMASK
from moelab.models import tree
from moelab.ops.lora import ADAPTER_KEYS, expert_lora_from_params, is_adapter
from moelab.train.config import LORA_TARGETS, LoraConfig

log = logging.getLogger("moelab")

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _kind(path: tree.Path) -> str | None:
    """Which LoRA target a dense linear at ``path`` (ending in "weight") belongs to."""
    if "router" in path or "experts" in path or "shared_gate" in path:
        return None
    if "attn" in path:
        return "attention"
    if "shared" in path:
        return "shared"
    if "mlp" in path:
        return "mlp"
    return None


def _target(path: tree.Path) -> str | None:
    """The LoRA target a parameter at ``path`` belongs to: ``experts`` (the stacked expert
    weights' ``gate_up``), ``router``, a dense linear's kind (its 2-D ``weight``), or None."""
    if path[-1] == "gate_up":
        return "experts"
    if path[-3:-1] == ("mlp", "router"):
        return "router"
    return _kind(path) if path[-1] == "weight" else None


def _kaiming_a(rank: int, fan_in: int, like: torch.Tensor, generator, lead=()) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as nn.Linear and PEFT
    t = torch.empty(*lead, rank, fan_in, dtype=torch.float32, device=like.device)
    return t.uniform_(-bound, bound, generator=generator).to(like.dtype)


def present_targets(params: dict) -> set[str]:
    """The LoRA targets this model has weights for (``router``: its router weights)."""
    return {
        _target(path)
        for path, w in tree.leaves(params)
        if _target(path) is not None and (path[-1] != "weight" or w.dim() == 2)
    }


def check_targets(params: dict, cfg: LoraConfig) -> None:
    """Raise, before anything is written, where a target of ``cfg`` matches no weight."""
    present = present_targets(params)
    absent = [t for t in cfg.targets if t not in present]
    if absent or not present & (set(cfg.targets) - {"router"}):
        raise ValueError(
            f"lora.targets={list(cfg.targets)}: {absent or 'router alone'} has no adapter "
            f"weights in this model (its targets: {sorted(present)}; router trains the router "
            "weight beside adapters, not alone)"
        )


def add_lora(params: dict, cfg: LoraConfig, generator: torch.Generator | None = None) -> int:
    """Add adapters on ``cfg.targets`` in place; returns how many linears or stacks got one."""
    check_targets(params, cfg)
    r, added = cfg.rank, 0
    for path, w in list(tree.leaves(params)):
        owner = tree.get(params, path[:-1])
        if path[-1] == "weight" and w.dim() == 2 and _kind(path) in cfg.targets:
            owner["lora_a"] = _kaiming_a(r, w.shape[1], w, generator)
            owner["lora_b"] = w.new_zeros(w.shape[0], r)
            added += 1
        elif path[-1] == "gate_up" and "experts" in cfg.targets:
            e, g, h = w.shape
            down = owner["down"]
            lora = {
                "down_a": _kaiming_a(r, down.shape[2], w, generator, (e,)),
                "down_b": down.new_zeros(e, h, r),
            }
            if cfg.gate_up == "fused":
                lora.update(
                    gate_up_a=_kaiming_a(r, h, w, generator, (e,)), gate_up_b=w.new_zeros(e, g, r)
                )
            else:
                for half in ("gate", "up"):
                    lora[f"{half}_a"] = _kaiming_a(r, h, w, generator, (e,))
                    lora[f"{half}_b"] = w.new_zeros(e, g // 2, r)
            owner["lora"] = lora
            added += 1
    return added


def trainable_predicate(cfg: LoraConfig) -> Callable[[tree.Path], bool]:
    """Which param paths train: everything without LoRA; else adapters (and the router)."""
    if cfg.rank is None:
        return lambda path: True
    train_router = "router" in cfg.targets

    def predicate(path: tree.Path) -> bool:
        if is_adapter(path):
            return True
        return train_router and path[-3:-1] == ("mlp", "router")

    return predicate


def without_adapters(node):
    """The params tree without its adapters: the base model's own tensors, shared, not copied."""
    if isinstance(node, dict):
        return {k: without_adapters(v) for k, v in node.items() if k not in ADAPTER_KEYS}
    if isinstance(node, list):
        return [without_adapters(v) for v in node]
    return node


def merged(params: dict, scale: float) -> dict:
    """A copy of the params with every adapter folded into its base weight (for export)."""

    def walk(node):
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node.detach().clone()
        out = {k: walk(v) for k, v in node.items() if k not in ADAPTER_KEYS}
        if "lora_a" in node:
            delta = scale * node["lora_b"].float() @ node["lora_a"].float()
            out["weight"] = (node["weight"].float() + delta).to(node["weight"].dtype)
        if "lora" in node:
            a1, b1, a2, b2, _ = expert_lora_from_params(node["lora"], scale)
            for key, a, b in (("gate_up", a1, b1), ("down", a2, b2)):
                delta = scale * torch.einsum("eor,eri->eoi", b.float(), a.float())
                out[key] = (node[key].float() + delta).to(node[key].dtype)
        return out

    return walk(params)


# ---- PEFT layout ---------------------------------------------------------------------------


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to ``rank``: the same product B A."""
    extra = rank - a.shape[-2]
    if extra == 0:
        return a, b
    a = torch.cat([a, a.new_zeros(*a.shape[:-2], extra, a.shape[-1])], dim=-2)
    return a, torch.cat([b, b.new_zeros(*b.shape[:-1], extra)], dim=-1)


def _interleave_rows(b_EGR: torch.Tensor) -> torch.Tensor:
    """Canonical gate-then-up rows -> alternating gate/up rows (GPT-OSS's stored order)."""
    gate, up = b_EGR.chunk(2, dim=1)
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def _deinterleave_rows(b_EGR: torch.Tensor) -> torch.Tensor:
    return torch.cat([b_EGR[:, 0::2], b_EGR[:, 1::2]], dim=1)


@dataclass(frozen=True)
class AdapterLayout:
    """How a family's params map to PEFT adapter keys.

    Attributes:
        names: base param path -> hub tensor name in the unquantised Transformers v5 layout.
        interleaved_gate_up: the family stores gate and up rows alternating (GPT-OSS).
    """

    names: dict[tuple, str]
    interleaved_gate_up: bool = False


def _adapter_tensors(params, layout: AdapterLayout, cfg: LoraConfig, rank: int):
    """(PEFT key, tensor) pairs."""
    hub_names, interleaved = layout.names, layout.interleaved_gate_up
    for path, _ in tree.leaves(params):
        if path[-1] == "lora_a":
            module = hub_names[(*path[:-1], "weight")].removesuffix(".weight")
            owner = tree.get(params, path[:-1])
            a, b = _pad_rank(owner["lora_a"], owner["lora_b"], rank)
            yield f"{PEFT_PREFIX}{module}.lora_A.weight", a
            yield f"{PEFT_PREFIX}{module}.lora_B.weight", b
        elif path[-1] == "gate_up_a" or path[-1] == "gate_a":
            experts = tree.get(params, path[:-2])
            lora = expert_lora_from_params(experts["lora"], 1.0)
            module = hub_names[(*path[:-2], "gate_up")].removesuffix(".gate_up_proj")
            gate_up_b = _interleave_rows(lora.gate_up_b) if interleaved else lora.gate_up_b
            for inner, a, b in (
                ("base_layer.", lora.gate_up_a, gate_up_b),
                ("", lora.down_a, lora.down_b),
            ):
                a, b = _pad_rank(a, b, rank)
                e = a.shape[0]
                yield f"{PEFT_PREFIX}{module}.{inner}lora_A.weight", a.reshape(e * rank, -1)
                yield (
                    f"{PEFT_PREFIX}{module}.{inner}lora_B.weight",
                    b.permute(1, 2, 0).reshape(b.shape[1], rank * e),
                )
        elif path[-3:-1] == ("mlp", "router") and "router" in cfg.targets:
            yield f"{PEFT_PREFIX}{hub_names[path]}", tree.get(params, path)


def save_adapter(
    params: dict,
    layout: AdapterLayout,
    cfg: LoraConfig,
    path: str | os.PathLike,
    base_model: str | None = None,
) -> None:
    """Write the adapters (and a trained router) in PEFT's layout, atomically.

    Into a folder that exists, only the two adapter files are replaced; its other files stay.

    PEFT takes one rank for all adapters: separate gate/up adapters make the experts' gate_up
    adapter rank 2r, so every adapter is written at rank 2r, zero-padded, with alpha doubled
    to keep the scale alpha / r.
    """
    separate = cfg.gate_up == "separate" and "experts" in cfg.targets
    rank = 2 * cfg.rank if separate else cfg.rank
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in _adapter_tensors(params, layout, cfg, rank)
    }
    modules = sorted(
        {
            k.removeprefix(PEFT_PREFIX).split(".")[-3]
            for k in tensors
            if ".lora_A." in k and ".experts." not in k
        }
    )
    # PEFT's v5 remap reads these names as the experts' whether the experts are adapted or not
    if {"gate_proj", "up_proj", "down_proj"} & set(modules):
        log.warning(
            "moelab: this adapter holds dense-MLP adapters; PEFT (0.21) "
            "takes gate_proj/up_proj/down_proj in target_modules for the experts' names and "
            "cannot load it (moelab.train.lora.load_adapter can)"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": cfg.alpha * rank / cfg.rank,
        # PEFT refuses dropout on adapted parameters (the experts); dropout only shapes
        # training, so an adapter on the experts is written without it
        "lora_dropout": 0.0 if "experts" in cfg.targets else cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "target_modules": modules,
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        if "experts" in cfg.targets
        else None,
        "modules_to_save": sorted({k.split(".")[-2] for k in tensors if ".lora_" not in k}) or None,
    }
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: nothing was written")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it 0700
        if target.exists():
            copy_kept_files(target, tmp, (ADAPTER_FILE, ADAPTER_CONFIG).__contains__)
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        os.chmod(tmp / ADAPTER_FILE, 0o666 & ~UMASK)  # safetensors writes 0600
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_adapter(params: dict, layout: AdapterLayout, path: str | os.PathLike) -> LoraConfig:
    """Put the adapters of a PEFT-layout folder into ``params`` (in place; fused form).

    Adapters the params already carry, of any targets or gate/up layout, are removed first: the
    params then hold exactly this folder's, and the forward is that of the folder loaded into a
    fresh base. Every key is resolved and read before the params change, so a folder that does
    not fit raises and leaves them as they were. A router the folder holds
    (``modules_to_save``) is copied over the params' router; one that an earlier adapter or its
    training replaced cannot be told from the base's, so it stays where the folder holds none
    (a warning says so when adapters were replaced): load into a fresh base then.
    """
    folder = Path(path)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} does not exist") from e
    routers, adapters, targets = _read_adapter(params, layout, folder)
    if any(is_adapter(p) for p, _ in tree.leaves(params)):
        _drop_adapters(params)
        if not routers:
            log.warning(
                "moelab: %s replaces the params' adapters but holds no router: the routers "
                "stay as the params hold them, changed if an earlier adapter or its training "
                "changed them (router target); load into a fresh base model to drop that",
                folder,
            )
    with torch.no_grad():
        for router, value in routers:
            router.copy_(value)
    for owner, keys, value in adapters:
        for key in keys[:-1]:
            owner = owner.setdefault(key, {})
        owner[keys[-1]] = value
    return LoraConfig(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        # what the adapter holds (save_adapter writes no moelab targets into its config)
        targets=[t for t in LORA_TARGETS if t in targets],
    )


def _read_adapter(params: dict, layout: AdapterLayout, folder: Path):
    """``(routers, adapters, targets)``: (router, value) pairs, (owner dict, keys under it,
    value) for each adapter tensor in the params' layout, and the LoRA targets held."""
    hub_names = layout.names
    entries = read_header(folder / ADAPTER_FILE)
    by_module = {
        v.removesuffix(".weight").removesuffix(".gate_up_proj"): k for k, v in hub_names.items()
    }
    routers, adapters, used, targets = [], [], set(), set()
    for key, entry in entries.items():
        module = key.removeprefix(PEFT_PREFIX)
        for suffix in (
            ".base_layer.lora_A.weight",
            ".base_layer.lora_B.weight",
            ".lora_A.weight",
            ".lora_B.weight",
        ):
            if module.endswith(suffix):
                module = module.removesuffix(suffix)
                break
        else:
            if module in hub_names.values():  # modules_to_save: a fully trained tensor
                base = next(p for p, n in hub_names.items() if n == module)
                router, value = tree.get(params, base), read_tensor(entry)
                if value.shape != router.shape:  # copy_ would broadcast it
                    raise CheckpointError(
                        f"{folder}: {key!r} has shape {list(value.shape)}, the model's "
                        f"{list(router.shape)}"
                    )
                routers.append((router, value))
                used.add(key)
                targets.add(_target(base))
            continue
        base = by_module.get(module)
        if base is None:
            raise CheckpointError(f"{folder}: adapter key {key!r} matches no module of the model")
        adapters.append(_placed(params, base, key, read_tensor(entry), layout.interleaved_gate_up))
        used.add(key)
        targets.add(_target(base))
    unused = sorted(set(entries) - used)
    if unused:
        raise CheckpointError(f"{folder}: adapter keys not understood: {unused[:8]}")
    return routers, adapters, targets


def _drop_adapters(node) -> None:
    if isinstance(node, dict):
        for key in ADAPTER_KEYS:
            node.pop(key, None)
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        for child in node:
            _drop_adapters(child)


def _placed(
    params: dict, base: tuple, key: str, value: torch.Tensor, interleaved: bool
) -> tuple[dict, tuple[str, ...], torch.Tensor]:
    owner = tree.get(params, base[:-1])
    is_a = ".lora_A." in key
    if base[-1] == "weight":  # dense linear
        w = owner["weight"]
        return owner, ("lora_a" if is_a else "lora_b",), value.to(w.dtype, copy=True).to(w.device)
    stack = "gate_up" if ".base_layer." in key else "down"
    w = owner[stack]
    e = w.shape[0]
    if is_a:
        t = value.reshape(e, -1, value.shape[-1])
    else:
        t = value.reshape(value.shape[0], -1, e).permute(2, 0, 1)
        if interleaved and stack == "gate_up":
            t = _deinterleave_rows(t)
    half = f"{stack}_{'a' if is_a else 'b'}"
    return owner, ("lora", half), t.to(w.dtype).contiguous().to(w.device)
