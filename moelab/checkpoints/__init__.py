"""safetensors read/write, per-family name maps, MXFP4 (de)quantisation (FP8 is refused)."""

from moelab.checkpoints.api import load_pretrained, read_config, save_pretrained
from moelab.checkpoints.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_pretrained", "read_config", "save_pretrained"]
