"""COOPER (arXiv 2512.04563) on BAGEL-7B-MoT in PyTorch: the model, its checkpoints and one pipeline API."""

from .checkpoint import CheckpointError, load_autoencoder, load_model, save_checkpoint
from .codecs import DepthCodec, SegmentationCodec, colorize_depth, default_palette
from .config import CooperConfig, preset
from .image_processor import CooperInputError
from .inference import Context, Inferencer
from .modeling import CooperModel
from .pipeline import BUNDLED_CHECKPOINT, AskOutput, CooperPipeline, DepthOutput, SegmentationOutput

__all__ = [
    "AskOutput", "BUNDLED_CHECKPOINT", "CheckpointError", "Context", "CooperConfig", "CooperInputError",
    "CooperModel", "CooperPipeline", "DepthCodec", "DepthOutput", "Inferencer", "SegmentationCodec",
    "SegmentationOutput", "colorize_depth", "default_palette", "load_autoencoder", "load_model", "preset",
    "save_checkpoint",
]
