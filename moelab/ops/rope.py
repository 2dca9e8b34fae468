"""Rotary position embeddings: default and YaRN frequencies, rotate-half application.

Math follows checkpoint-formats.md §1.4: frequencies and angles in fp32, cos/sin scaled by the
attention factor and cast to the compute dtype, the rotation itself in the compute dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from moelab.kernels.rope import rope

ROPE_KINDS = ("default", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    ``rotary_dim`` channels of each head rotate (all of them unless partial rotary). YaRN fields:
    ``factor`` (s), ``original_max_position`` (L0), ``beta_fast``, ``beta_slow``, ``mscale``,
    ``mscale_all_dim``, ``attention_factor`` and ``truncate``.
    """

    theta: float
    rotary_dim: int
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unsupported rope type {self.kind!r}; expected one of {ROPE_KINDS}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.kind == "yarn" and self.original_max_position is None:
            raise ValueError("yarn rope needs original_max_position")


def _yarn_mscale(scale: float, k: float = 1.0) -> float:
    return 0.1 * k * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope_frequencies(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim / 2] fp32, attention_factor)``."""
    d = cfg.rotary_dim
    pos_freqs = cfg.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if cfg.kind == "default":
        return 1.0 / pos_freqs, 1.0

    s = cfg.factor

    def correction_dim(rotations: float) -> float:
        return (
            d
            * math.log(cfg.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(cfg.theta))
        )

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # low (fast-rotating) dims keep their frequency, high ones are interpolated by 1/s; the
    # weights are spelled as the reference does (1 - (1 - ramp) is not ramp in fp32)
    keep = 1 - ramp
    inv_freq = (1.0 / (s * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    if cfg.attention_factor is not None:
        factor = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        factor = _yarn_mscale(s, cfg.mscale) / _yarn_mscale(s, cfg.mscale_all_dim)
    else:
        factor = _yarn_mscale(s)
    return inv_freq, factor


@functools.lru_cache(maxsize=16)
def _frequencies_on(cfg: RopeConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """``rope_frequencies`` computed on the CPU (the reference models' bits) and copied to
    ``device`` once: a copy from host memory synchronises, so not one per forward."""
    inv_freq, factor = rope_frequencies(cfg)
    return inv_freq.to(device), factor


def rope_cos_sin(
    cfg: RopeConfig, position_ids_BS: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, S, rotary_dim]`` for integer positions, in the compute dtype."""
    inv_freq, factor = _frequencies_on(cfg, position_ids_BS.device)
    angles = position_ids_BS.float()[..., None] * inv_freq  # [B, S, d/2], fp32
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def apply_rope(x_BNSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) pairing on the first ``R`` channels of each head; the rest pass.

    On CUDA one Triton pass each way (:mod:`moelab.kernels.rope`, fp32 with one rounding); on
    CPU the reference models' spelling in the compute dtype, bit for bit.
    """
    if x_BNSD.is_cuda:
        return rope(x_BNSD, cos_BSR, sin_BSR)
    return rope_reference(x_BNSD, cos_BSR, sin_BSR)


def rope_reference(
    x_BNSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor
) -> torch.Tensor:
    """:func:`apply_rope` as torch ops in the compute dtype (the reference models' rounding)."""
    rot = cos_BSR.shape[-1]
    cos, sin = cos_BSR[:, None], sin_BSR[:, None]
    x_rot, x_pass = x_BNSD[..., :rot], x_BNSD[..., rot:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)
