"""The exported graphs (`cooper_model.export`) under ONNX Runtime.

The graphs are exported on first use into `onnx_dir` (default: a folder under the cache named
after a hash of the weights) and reused while the weights and the export format are unchanged.
On CUDA the CUDA execution provider is required; the CPU provider runs CPU models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .. import export as ex
from .base import Backend, BackendUnavailable, single_device

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("COOPER_CACHE", Path.home() / ".cache" / "cooper"))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, inferencer, onnx_dir: str | Path | None = None, threads: int | None = None,
                 export_height: int | None = None, export_width: int | None = None):
        super().__init__(inferencer)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime, or "
                                     "onnxruntime-gpu for CUDA)") from None
        device = single_device(inferencer)
        available = ort.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(f"the model is on {device} but this onnxruntime has only {available} "
                                         "(install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise BackendUnavailable(f"onnxruntime does not run models on {device}")
        if inferencer.model.dtype == torch.bfloat16 and device.type == "cpu":
            raise BackendUnavailable("onnxruntime's CPU provider has no bfloat16 kernels for these graphs; "
                                     "use dtype float32")
        side = inferencer.config.vae_transform.max_size
        self.onnx_dir = Path(onnx_dir) if onnx_dir else cache_root() / "onnx" / ex.weights_hash(inferencer)[:16]
        ex.ensure_exported(inferencer, self.onnx_dir, export_height or side, export_width or side)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # idle ORT threads must not spin: torch runs the prefill and the sampling loop between calls
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device = device
        self.denoise = ort.InferenceSession(str(self.onnx_dir / ex.DENOISE_FILE), options, providers=providers)
        self.vae_decoder = ort.InferenceSession(str(self.onnx_dir / ex.VAE_DECODER_FILE), options, providers=providers)
        self.kv_dtype = _numpy_dtype(self.denoise, "kv")

    def prepare(self, contexts, height, width):
        inf = self.inferencer
        packed = ex.pack_contexts(contexts)
        kv = packed.kv.to("cpu").numpy().astype(self.kv_dtype, copy=False)
        kv_len, rope = packed.kv_len.cpu().numpy(), packed.rope_pos.cpu().numpy()
        pos = inf._latent_positions(height, width).cpu().numpy()

        def step(x, t, branches):
            feeds = {"latents": x.detach().to("cpu", torch.float32).numpy(), "timestep": np.array([t], np.float32),
                     "latent_pos": pos, "rope_pos": rope[:branches], "kv": kv[:branches], "kv_len": kv_len[:branches]}
            return torch.from_numpy(self.denoise.run(None, feeds)[0]).to(self.device)

        return step

    def decode(self, latent):
        out = self.vae_decoder.run(None, {"latent": latent.detach().to("cpu", torch.float32).numpy()})[0]
        return torch.from_numpy(out).to(self.device)

    def describe(self):
        return {"backend": self.name, "onnx_dir": str(self.onnx_dir), "providers": self.denoise.get_providers()}


def _numpy_dtype(session, name: str):
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kind, np.float32)
