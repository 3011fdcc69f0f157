"""`torch.compile` of the batched denoise step (`export.DenoiseStep`), with CUDA graphs on CUDA.

The decoder layer is what is compiled (once: every layer runs the same compiled code with its own
weights); embedding and heads around it are small and stay eager.

Shapes are kept fixed so the compiled code is reused: the KV context is padded up to a bucket
(the mask makes padding exact), the latent count is fixed by the resolution and the branch count
is 1, 2 or 3, so a camera stream compiles at most three variants per resolution and bucket. On
CUDA each variant is captured once into a CUDA graph over static buffers: the packed KV context is
written into its static buffer once per image and each step copies only the latents and t before
replaying the whole step. The VAE decoder is compiled the same way (without a graph).

UNVERIFIED on a GPU here: the CUDA-graph path (`cuda_graphs=True`) has only been written, not run;
on CPU the compiled step is tested against eager.
"""

from __future__ import annotations

import logging

import torch

from .. import export as ex
from .base import Backend, BackendUnavailable, single_device

log = logging.getLogger(__name__)


class CompileBackend(Backend):
    name = "compile"

    def __init__(self, inferencer, mode: str | None = None, cuda_graphs: bool | None = None,
                 context_buckets: tuple[int, ...] | None = None):
        super().__init__(inferencer)
        self.device = single_device(inferencer)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise BackendUnavailable("CUDA graphs need the model on a CUDA device")
        # inductor's own CUDA graphs would nest inside ours; the other settings of max-autotune stay
        self.mode = mode or ("max-autotune-no-cudagraphs" if on_cuda else None)
        self.buckets = tuple(context_buckets) if context_buckets else ex.context_buckets(8192, smallest=128)
        self.module = ex.denoise_step_module(inferencer)
        # One decoder layer is compiled and shared by all layers (compiling the unrolled 28-layer
        # step would take minutes per branch count); the CUDA graph still covers the whole step.
        self.module.layer_fn = torch.compile(self.module._layer, dynamic=False, mode=self.mode)
        self.step_fn = self.module
        self.vae_fn = torch.compile(ex.VaeDecoder(inferencer.vae).eval(), dynamic=False, mode=self.mode)
        self.graphs: dict[tuple, _CapturedStep] = {}
        self.kv_buffers: dict[int, torch.Tensor] = {}

    def prepare(self, contexts, height, width):
        size = ex.bucket(max(c.length for c in contexts), self.buckets)
        pos = self.inferencer._latent_positions(height, width)
        if not self.cuda_graphs:
            packed = ex.pack_contexts(contexts, pad_to=size)

            def step(x, t, branches):
                return self.step_fn(x.float(), torch.tensor([t], device=self.device), pos, packed.rope_pos[:branches],
                                    packed.kv[:branches], packed.kv_len[:branches])

            return step
        # one static KV buffer per bucket (three branches), shared by the graphs of that bucket
        buffer = self.kv_buffers.get(size)
        if buffer is None:
            attn = self.module.model.language_model.model.layers[0].self_attn
            layers = len(self.module.model.language_model.model.layers)
            buffer = self.kv_buffers[size] = torch.zeros(3, layers, 2, size, attn.num_kv_heads, attn.head_dim,
                                                         dtype=self.inferencer.model.dtype, device=self.device)
        packed = ex.pack_contexts(contexts, pad_to=size, out=buffer)

        def step(x, t, branches):
            key = (branches, x.shape[0], size)
            graph = self.graphs.get(key)
            if graph is None:
                log.info("capturing a CUDA graph of the denoise step for %d branch(es), %d latents, context %d",
                         *key)
                graph = self.graphs[key] = _CapturedStep(self.step_fn, x, pos, buffer[:branches], self.device)
            return graph(x, t, packed.rope_pos[:branches], packed.kv_len[:branches])

        return step

    def decode(self, latent):
        return self.vae_fn(latent.to(self.device, torch.float32))

    def describe(self):
        return {"backend": self.name, "mode": self.mode, "cuda_graphs": self.cuda_graphs,
                "captured_graphs": len(self.graphs)}


class _CapturedStep:
    """One CUDA graph of the compiled step over static input buffers (the KV buffer is shared)."""

    def __init__(self, fn, x, pos, kv, device):
        self.x = x.detach().to(device, torch.float32).clone()
        self.t = torch.zeros(1, device=device)
        self.pos = pos.to(device).clone()
        self.kv = kv
        self.rope = torch.zeros(kv.shape[0], dtype=torch.long, device=device)
        self.kv_len = torch.ones(kv.shape[0], dtype=torch.long, device=device)
        args = (self.x, self.t, self.pos, self.rope, self.kv, self.kv_len)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and warm the allocator outside the capture
                fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*args)

    def __call__(self, x, t, rope, kv_len):
        self.x.copy_(x)
        self.t.fill_(float(t))
        self.rope.copy_(rope)
        self.kv_len.copy_(kv_len)
        self.graph.replay()
        return self.out.clone()
