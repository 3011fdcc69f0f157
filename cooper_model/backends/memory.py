"""Memory plans: what of the model sits on the GPU, and in which precision.

BAGEL-7B-MoT in bf16 is ~29 GB of weights (two 7B LLM experts, the ViT, the text head). Plans:
- "int8" / "fp8": weight-only quantization of both LLM experts' linear layers (per output channel
  int8, or float8 E4M3 with a per-channel scale); activations stay in the compute dtype and each
  weight is dequantized when its layer runs. Halves the experts' memory.
- "maps": for jobs that only make depth/segmentation maps. They need the generation expert for the
  denoise loop and the understanding expert for the context, but not the text head; the ViT runs
  once per frame (prefill). Both are kept on the CPU and brought to the GPU when used
  (accelerate's offload hooks), so the job still works if it does use them.
- "text": for text-only jobs (COOPER's `direct` and `text` modes add the image with the ViT only):
  the generation expert and the latent heads are kept on the CPU.
Plans combine: "int8+maps".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PLANS = ("none", "int8", "fp8", "maps", "text")


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or float8 E4M3 with a scale per output row."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        if kind == "int8":
            scale = amax / 127.0
            q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
        elif kind == "fp8":
            scale = amax / 448.0  # E4M3's largest finite value
            q = (w / scale).to(torch.float8_e4m3fn)
        else:
            raise ValueError(f"weight-only quantization {kind!r}: int8 or fp8")
        self.kind, self.in_features, self.out_features = kind, linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def quantize_llm_experts(model, kind: str) -> int:
    """Replace every nn.Linear of the decoder layers (both experts) in place; returns the count."""
    count = 0
    for layer in model.language_model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, WeightOnlyLinear(child, kind))
                    count += 1
    return count


def _offload(modules, device) -> None:
    from accelerate import cpu_offload

    for module in modules:
        cpu_offload(module, execution_device=device)


def generation_modules(model):
    out = [model.time_embedder, model.vae2llm, model.llm2vae, model.latent_pos_embed, model.language_model.model.norm_moe_gen]
    for layer in model.language_model.model.layers:
        attn = layer.self_attn
        out += [layer.mlp_moe_gen, layer.input_layernorm_moe_gen, layer.post_attention_layernorm_moe_gen,
                attn.q_proj_moe_gen, attn.k_proj_moe_gen, attn.v_proj_moe_gen, attn.o_proj_moe_gen,
                attn.q_norm_moe_gen, attn.k_norm_moe_gen]
    return out


def apply_memory_plan(model, plan: str) -> dict:
    """Apply "none", "int8", "fp8", "maps", "text" or a "+"-joined combination. Returns what it did."""
    parts = [p for p in plan.split("+") if p and p != "none"]
    unknown = [p for p in parts if p not in PLANS]
    if unknown or ("int8" in parts and "fp8" in parts):
        raise ValueError(f"memory plan {plan!r}: combine at most one of int8/fp8 with maps or text")
    device = model.device
    done = {}
    for part in parts:
        if part in ("int8", "fp8"):
            done[part] = quantize_llm_experts(model, part)
        elif part == "maps":
            _offload([model.language_model.lm_head, model.vit_model, model.connector], device)
            done[part] = "lm_head, vit_model, connector offloaded"
        elif part == "text":
            _offload(generation_modules(model), device)
            done[part] = "generation expert offloaded"
    return done


def bytes_on(model, device) -> int:
    """Bytes of parameters and buffers resident on `device`."""
    device = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == device.type and (device.index is None or t.device.index == device.index) \
                and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
