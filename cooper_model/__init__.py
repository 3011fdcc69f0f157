"""COOPER (arXiv 2512.04563) on BAGEL-7B-MoT in PyTorch: the model, its checkpoints and one pipeline API.

Names are imported on first use, so `cooper_model.codecs` (numpy only) loads without torch.
"""

import importlib

_EXPORTS = {
    "AskOutput": "pipeline", "BUNDLED_CHECKPOINT": "pipeline", "CooperPipeline": "pipeline",
    "DepthOutput": "pipeline", "SegmentationOutput": "pipeline",
    "CheckpointError": "checkpoint", "load_autoencoder": "checkpoint", "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DepthCodec": "codecs", "SegmentationCodec": "codecs", "colorize_depth": "codecs", "default_palette": "codecs",
    "CooperConfig": "config", "preset": "config",
    "CooperInputError": "image_processor",
    "Context": "inference", "GenerationInterrupted": "inference", "Inferencer": "inference",
    "CooperModel": "modeling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cooper_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
