"""A model object: a family's forward bound to its config and params. It holds no logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from moelab.models.options import ForwardOptions


@dataclass
class Model:
    """``(config, params, forward)`` of one family, callable as ``model(input_ids) -> logits``.

    Attributes:
        family: the module under ``moelab.models`` (``forward``, ``hidden_states``, ...).
        config: that family's ``Config``.
        params: the parameter tree (nested dicts and lists of tensors).
        options: default :class:`ForwardOptions` (backend, attention implementation, LoRA scale).
    """

    family: ModuleType
    config: Any
    params: dict
    options: ForwardOptions = field(default_factory=ForwardOptions)

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("options", self.options)
        return self.family.forward(self.config, self.params, input_ids, **kwargs)
