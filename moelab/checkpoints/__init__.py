"""safetensors read/write, per-family name maps, FP8-block and MXFP4 dequantisation."""

from moelab.checkpoints.api import load_pretrained, read_config, save_pretrained
from moelab.checkpoints.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_pretrained", "read_config", "save_pretrained"]
