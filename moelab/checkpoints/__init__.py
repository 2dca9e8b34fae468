"""safetensors read/write, per-family name maps, FP8-block and MXFP4 dequantisation."""
