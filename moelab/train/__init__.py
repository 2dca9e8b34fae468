"""Training: loss, step, optimizer groups, data, metrics, logging, checkpoint and resume."""
