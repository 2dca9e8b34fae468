"""moelab: composable, functional Mixture-of-Experts layers, kernels and training on PyTorch.

Layers (imports point down only): ``ops`` (pure tensor functions), ``kernels`` (expert-MLP
backends), ``models``, ``checkpoints``, ``train``, ``bench``. See shared/docs/design.md.
"""

__version__ = "0.1.0"

from moelab.checkpoints import CheckpointError, load_pretrained, read_config, save_pretrained
from moelab.models.model import Model
from moelab.models.options import ForwardOptions

__all__ = [
    "CheckpointError",
    "ForwardOptions",
    "Model",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
