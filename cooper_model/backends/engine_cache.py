"""A cache of TensorRT engines that never loads a stale or foreign engine.

An engine is only valid for the GPU model and compute capability, the TensorRT version, the
precision, the optimisation profiles and the exact ONNX graph it was built from. All of these form
the key; the file name carries its digest and a JSON file beside the engine records the fields and
the engine's own hash. An engine loads only when every recorded field equals the current one and
its bytes hash to the recorded value; otherwise it is rebuilt (and the reason is logged). A rebuild
happens only on a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What an engine is compiled for."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    @classmethod
    def current(cls, device_index: int = 0) -> "Target":
        import tensorrt as trt
        import torch

        return cls(torch.cuda.get_device_name(device_index), tuple(torch.cuda.get_device_capability(device_index)),
                   trt.__version__)


@dataclass(frozen=True)
class EngineKey:
    graph: str  # "denoise" or "vae_decoder"
    onnx_sha256: str
    precision: str
    # per optimisation profile, per input: (name, min shape, opt shape, max shape)
    profiles: tuple
    target: Target

    def fields(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as read back from JSON

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:20]

    def stem(self) -> str:
        major, minor = self.target.compute_capability
        return f"{self.graph}-{self.precision}-sm{major}{minor}-trt{self.target.tensorrt_version}-{self.digest()}"


class EngineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.builds = 0  # engines built by this cache object (tests and logs read it)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        return self.root / f"{key.stem()}.engine", self.root / f"{key.stem()}.json"

    def load(self, key: EngineKey) -> bytes | None:
        """The engine for `key`, or None (with the reason logged) when there is no valid one."""
        engine, meta = self.paths(key)
        if not engine.is_file():
            return None
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError):
            log.warning("%s: no readable metadata beside it; not loading it, rebuilding", engine)
            return None
        differs = [k for k, v in key.fields().items() if recorded.get("key", {}).get(k) != v]
        if differs:
            log.warning("%s was built for another %s; not loading it, rebuilding", engine, ", ".join(differs))
            return None
        data = engine.read_bytes()
        if hashlib.sha256(data).hexdigest() != recorded.get("engine_sha256"):
            log.warning("%s does not match its recorded hash (truncated or replaced); rebuilding", engine)
            return None
        return data

    def store(self, key: EngineKey, data: bytes, build_seconds: float | None = None) -> Path:
        """Write atomically (a crash mid-write leaves no half engine under the real name)."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, meta = self.paths(key)
        for path, payload in ((engine, data), (meta, json.dumps(
                {"key": key.fields(), "engine_sha256": hashlib.sha256(data).hexdigest(),
                 "build_seconds": build_seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2).encode())):
            tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
            tmp.write_bytes(payload)
            os.replace(tmp, path)
        return engine

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(engine bytes, whether it was built now)."""
        data = self.load(key)
        if data is not None:
            log.info("loaded cached engine %s", self.paths(key)[0].name)
            return data, False
        start = time.perf_counter()
        log.info("building TensorRT engine %s (this takes minutes for a large model)", key.stem())
        data = build()
        seconds = time.perf_counter() - start
        self.builds += 1
        path = self.store(key, data, seconds)
        log.info("built %s in %.1f s (%.1f MiB)", path.name, seconds, len(data) / 2**20)
        return data, True
