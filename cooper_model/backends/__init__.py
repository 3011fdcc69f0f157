"""Execution backends of the denoise loop and the VAE decoder, behind `CooperPipeline`.

    pipe = CooperPipeline.from_pretrained(path, device="cuda", backend="tensorrt,onnxruntime,eager")
    pipe.backend        # the one in use, e.g. "onnxruntime"
    pipe.backend_notes  # why the ones before it were skipped

| name          | what runs the denoise step and the VAE decode                                   |
|---------------|---------------------------------------------------------------------------------|
| `eager`       | the PyTorch model, one forward pass per CFG branch (the reference)              |
| `compile`     | `torch.compile` of the batched step (`export.DenoiseStep`), CUDA graphs on CUDA |
| `onnxruntime` | the exported ONNX graphs (`export.py`) under ONNX Runtime                       |
| `tensorrt`    | TensorRT engines built from those graphs, cached per GPU/TensorRT/precision/shape |

Prefill (ViT, VAE encode, context) and text generation always run eagerly. A backend that cannot
run here (TensorRT not installed, no CUDA, ...) raises `BackendUnavailable` with the reason; a
fallback chain logs it and tries the next name.
"""

from __future__ import annotations

import logging

from .base import Backend, BackendUnavailable, StepFn

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")


def parse_chain(spec) -> list[str]:
    """"tensorrt,onnxruntime,eager" or ["tensorrt", "eager"] -> names, checked."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise ValueError("backend is empty; choose from " + ", ".join(BACKENDS))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {', '.join(map(repr, unknown))}; available: {', '.join(BACKENDS)}")
    return names


def create_backend(name: str, inferencer, options: dict | None = None) -> Backend:
    options = dict(options or {})
    if name == "eager":
        from .eager import EagerBackend
        return EagerBackend(inferencer, **options.get("eager", {}))
    if name == "compile":
        from .compiled import CompileBackend
        return CompileBackend(inferencer, **options.get("compile", {}))
    if name == "onnxruntime":
        from .ort import OnnxRuntimeBackend
        return OnnxRuntimeBackend(inferencer, **options.get("onnxruntime", {}))
    if name == "tensorrt":
        from .trt import TensorRTBackend
        return TensorRTBackend(inferencer, **options.get("tensorrt", {}))
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


def select_backend(spec, inferencer, options: dict | None = None) -> Backend:
    """The first backend of the chain that works here. `options` maps a backend name to keyword
    arguments of its class (e.g. {"tensorrt": {"precision": "fp8"}})."""
    notes = []
    for name in parse_chain(spec):
        try:
            backend = create_backend(name, inferencer, options)
        except BackendUnavailable as exc:
            notes.append(f"{name}: {exc}")
            log.warning("backend %s is unavailable here: %s; trying the next one", name, exc)
            continue
        backend.notes = notes
        if notes:
            log.warning("using backend %s (%s)", name, "; ".join(notes))
        else:
            log.info("using backend %s", name)
        return backend
    raise BackendUnavailable("no backend of " + repr(spec) + " can run here: " + "; ".join(notes))


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "StepFn", "create_backend", "parse_chain", "select_backend"]
