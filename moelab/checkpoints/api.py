"""``read_config``, ``load_pretrained`` and ``save_pretrained`` for every supported family."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
from tqdm.auto import tqdm

from moelab.checkpoints import gpt_oss as gpt_oss_names
from moelab.checkpoints import mapping
from moelab.checkpoints import qwen3_moe as qwen3_names
from moelab.checkpoints.safetensors_io import (
    CheckpointError,
    TensorEntry,
    checkpoint_entries,
    stored_dtype,
    write_checkpoint,
)
from moelab.models import gpt_oss, qwen3_moe, tree
from moelab.models.model import Model
from moelab.models.options import ForwardOptions
from moelab.ops.lora import is_adapter

log = logging.getLogger("moelab")

# model_type -> (model module, checkpoint name-map module)
FAMILIES: dict[str, tuple[ModuleType, ModuleType]] = {
    "qwen3_moe": (qwen3_moe, qwen3_names),
    "qwen3_vl_moe": (qwen3_moe, qwen3_names),
    "gpt_oss": (gpt_oss, gpt_oss_names),
}
HEAD_NAME = "lm_head.weight"  # every family's


def _family(model_type: str | None) -> tuple[ModuleType, ModuleType]:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def read_config(path: str | os.PathLike) -> qwen3_moe.Config | gpt_oss.Config:
    """The family ``Config`` parsed from ``<path>/config.json``."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file} does not exist") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from e
    model, names = _family(raw.get("model_type"))
    quant = raw.get("quantization_config")
    if quant is not None and quant.get("quant_method") not in names.QUANT_METHODS:
        raise CheckpointError(
            f"{file}: quantization_config.quant_method={quant.get('quant_method')!r} is not "
            f"supported for {raw['model_type']} (supported: {names.QUANT_METHODS or 'none'}); "
            "dequantise the checkpoint to bf16 first"
        )
    try:
        return model.Config.from_hf(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    options: ForwardOptions | None = None,
) -> Model:
    """Load a hub-layout checkpoint folder (single file or sharded) into a :class:`Model`.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` or a shard index.
        dtype: parameter dtype. Default: what Transformers' ``from_pretrained`` picks without
            one (``dtype="auto"``): the config's ``dtype`` / ``torch_dtype``, else the shard
            index's ``metadata.dtype``, else the dtype of the first floating-point tensor by
            name in the first file, else float32.
        device: where the parameters live (default CPU).
        options: default forward options of the returned model.

    Tensors are read one at a time straight into their final (stacked) place; the checkpoint is
    checked in full before any of it is read, so a bad one raises before memory is spent. A
    config that ties the embeddings but a file that also holds an ``lm_head.weight`` loads as
    Transformers 5 loads it: tied only where the two are equal in ``dtype``.
    """
    cfg = read_config(path)
    model_module, names = _family(cfg.model_type)
    entries = checkpoint_entries(path)
    dtype = dtype or cfg.dtype or stored_dtype(path, entries) or torch.float32
    head_stored = cfg.tie_word_embeddings and HEAD_NAME in entries
    if head_stored:  # loaded as its own param first; tied again below if it equals the embedding
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    meta = model_module.init_params(cfg, dtype=dtype, device="meta")
    layout = names.expert_layout(cfg, set(entries))
    targets = names.targets(cfg, meta, layout)
    if head_stored:
        entries = _embedding_from_head_if_absent(entries, targets)
    mapping.check_entries(entries, targets, meta, lambda n: names.ignored(cfg, n))
    params = tree.map_leaves(lambda p, t: torch.empty(t.shape, dtype=dtype, device=device), meta)

    def progress(items):
        return tqdm(
            items,
            total=len(targets),
            desc=f"loading {Path(path).name}",
            unit="tensor",
            disable=len(targets) < 200,
            leave=False,
        )

    mapping.load_into(params, entries, targets, progress)
    if head_stored:
        cfg = _tie_if_equal(cfg, params, path)
    log.info(
        "moelab: loaded %s from %s: %.3fB parameters, %s on %s",
        cfg.model_type,
        path,
        tree.count(params) / 1e9,
        str(dtype).removeprefix("torch."),
        device or "cpu",
    )
    return Model(model_module, cfg, params, options or ForwardOptions())


def _embedding_from_head_if_absent(
    entries: dict[str, TensorEntry], targets: dict[str, mapping.Target]
) -> dict[str, TensorEntry]:
    # NOTE: Transformers ties symmetrically: a tied config whose file holds the head but not the
    # embedding gets the embedding from the head
    embed = next(name for name, t in targets.items() if t.path == ("embed", "weight"))
    return {embed: entries[HEAD_NAME], **entries}


def _tie_if_equal(
    cfg: qwen3_moe.Config | gpt_oss.Config, params: dict, path: str | os.PathLike
) -> qwen3_moe.Config | gpt_oss.Config:
    """The config tied again, the head dropped, where the loaded head equals the embedding.

    Transformers 5 (``PreTrainedModel.tie_weights``) compares the two after the cast to the
    load dtype and leaves them untied where they differ, so the stored head makes the logits.
    """
    if torch.equal(params["lm_head"]["weight"], params["embed"]["weight"]):
        del params["lm_head"]
        return dataclasses.replace(cfg, tie_word_embeddings=True)
    log.warning(
        "moelab: %s: config.json ties the embeddings but %s differs from them; using it "
        "untied, as Transformers does (the model saves with tie_word_embeddings false)",
        path,
        HEAD_NAME,
    )
    return cfg


def save_pretrained(
    model: Model,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    experts_format: str | None = None,
) -> None:
    """Write ``model`` in the hub layout (``config.json`` + safetensors), atomically.

    ``experts_format="mxfp4"`` re-quantises GPT-OSS experts the way the hub release stores them
    (experts that did not change come back bit for bit); by default tensors keep their dtype.
    """
    _, names = _family(model.config.model_type)
    layout = names.save_layout(model.config)
    if experts_format is not None:
        if experts_format not in names.save_layouts(model.config):
            raise ValueError(
                f"experts_format={experts_format!r} is not available for "
                f"{model.config.model_type} (layouts: {names.save_layouts(model.config)})"
            )
        layout = experts_format
    adapters = [tree.dotted(p) for p, _ in tree.leaves(model.params) if is_adapter(p)]
    if adapters:
        raise ValueError(
            f"the model carries LoRA adapters ({adapters[0]}, ...), which the hub layout has no "
            "place for: save them with moelab.train.lora.save_adapter, or fold them into the "
            "weights first (moelab.train.lora.merged)"
        )
    targets = names.targets(model.config, model.params, layout)
    stored = {t.path for t in targets.values()}
    unmapped = [tree.dotted(p) for p, _ in tree.leaves(model.params) if p not in stored]
    if unmapped:
        raise ValueError(f"no hub name for params {unmapped[:4]}: nothing was written")
    dtypes = {t.dtype for _, t in tree.leaves(model.params)}
    config = model.config.to_hf()
    if len(dtypes) == 1:  # the tensors' dtype, at every level a loader reads one from
        for level in (config, config.get("text_config")):
            if level is not None:
                level.pop("dtype", None)
                level["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
    config.update(names.provenance(layout))
    if layout == "mxfp4":
        config["quantization_config"] = dict(names.MXFP4_CONFIG)
    write_checkpoint(path, mapping.saved_tensors(model.params, targets), config, max_shard_bytes)
