"""Shims and edits that let an upstream BAGEL checkout run on a CPU with the transformers in our venv.

This file is ours (it contains no upstream code). `prepare(upstream_dir)` makes a checkout of
ByteDance-Seed/Bagel importable for `upstream_parity.py`:

1. It writes the shim modules below into the checkout (overwriting upstream's copies of the
   transformers 4.4x files, which do not import under transformers 5):
   - `flash_attn/__init__.py`: `flash_attn_varlen_func` in plain PyTorch (SDPA per segment of
     cu_seqlens; causal masks are bottom-right aligned like flash-attn when q_len < k_len; GQA by
     repeating each KV head for its group of query heads, as flash-attn maps query head h to KV
     head h // (H / H_kv)).
   - `modeling/qwen2/{configuration,modeling}_qwen2.py`: transformers' Qwen2 classes, except
     `Qwen2Attention`, which is rebuilt with the attribute set of transformers 4.4x
     (`num_heads`, `num_key_value_heads`, `hidden_size`, `head_dim`, q/k/v/o projections) that
     upstream's `PackedAttention(MoT)` reads. Upstream never calls its forward.
     The config drops `_attn_implementation="flash_attention_2"` (transformers 5 refuses to build a
     model with it when flash-attn is absent; upstream's inference never uses HF attention) and
     keeps `is_causal`.
   - `modeling/siglip/{configuration,modeling}_siglip.py`: re-exports of transformers' SigLIP
     config, `SiglipAttention` and `SiglipPreTrainedModel`.
2. It edits upstream's own files in place, each edit an exact string replacement that must match
   (listed in `EDITS`):
   - `.to('cuda')` / `.to('cuda', ...)` become no-ops (tensors stay on their device);
   - the hard-coded bf16 casts in `qwen2_navit.py` (`forward_inference`, MoT MLP) and
     `siglip_navit.py` (encoder input, attention) are removed, so the comparison runs in fp32;
   - `inferencer.py` `decode_image`: `latent.to('cuda', dtype=torch.bfloat16)` -> `latent`.
   A marker file `.cooper_parity_prepared` records what was done; running again is a no-op.
3. `pip install einops` is needed by upstream's `modeling/autoencoder.py` (not by this project).

Usage: python tests/parity/upstream_shims.py /path/to/Bagel
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = ".cooper_parity_prepared"

FLASH_ATTN = '''"""CPU stand-in for flash_attn.flash_attn_varlen_func (written for the COOPER parity test)."""
import torch
import torch.nn.functional as F


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """q [Tq, H, D], k/v [Tk, Hkv, D]; segments given by cu_seqlens. Returns [Tq, H, D]."""
    if dropout_p:
        raise NotImplementedError("dropout is not supported by the CPU stand-in")
    h, hkv = q.shape[1], k.shape[1]
    out = q.new_empty(q.shape)
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # [H, Lq, D]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
        lq, lk = qi.shape[1], ki.shape[1]
        mask = None
        if causal:  # bottom-right aligned, as flash-attn >= 2.1
            mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask, scale=softmax_scale)[0]
        out[cq[i]:cq[i + 1]] = o.transpose(0, 1).to(out.dtype)
    return out
'''

QWEN2_CONFIG = '''"""Shim (COOPER parity test): transformers' Qwen2Config with upstream's 4.4x keyword arguments."""
from transformers import Qwen2Config as _HFQwen2Config


class Qwen2Config(_HFQwen2Config):
    def __init__(self, is_causal=True, _attn_implementation=None, rope_scaling=None, **kwargs):
        # Upstream asks for "flash_attention_2"; its inference path never uses HF attention.
        if rope_scaling is not None:
            kwargs["rope_scaling"] = rope_scaling
        super().__init__(**kwargs)
        self.is_causal = is_causal
'''

QWEN2_MODELING = '''"""Shim (COOPER parity test): transformers' Qwen2 building blocks; Qwen2Attention with the 4.4x attributes."""
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (  # noqa: F401
    Qwen2MLP,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)


class Qwen2Attention(nn.Module):
    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = config.max_position_embeddings
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
'''

SIGLIP_CONFIG = '''"""Shim (COOPER parity test): transformers' SiglipVisionConfig."""
from transformers import SiglipVisionConfig  # noqa: F401
'''

SIGLIP_MODELING = '''"""Shim (COOPER parity test): transformers' SigLIP attention and base class."""
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipPreTrainedModel  # noqa: F401
'''

SHIMS = {
    "flash_attn/__init__.py": FLASH_ATTN,
    "modeling/qwen2/__init__.py": "",
    "modeling/qwen2/configuration_qwen2.py": QWEN2_CONFIG,
    "modeling/qwen2/modeling_qwen2.py": QWEN2_MODELING,
    "modeling/siglip/__init__.py": "",
    "modeling/siglip/configuration_siglip.py": SIGLIP_CONFIG,
    "modeling/siglip/modeling_siglip.py": SIGLIP_MODELING,
}

# (file, old, new): every occurrence is replaced; the old string must occur at least once.
EDITS = [
    ("modeling/bagel/qwen2_navit.py", ".to(torch.bfloat16)", ""),
    ("modeling/bagel/qwen2_navit.py", ".to('cuda')", ""),
    ("modeling/bagel/siglip_navit.py", ".to('cuda', torch.bfloat16)", ""),
    ("modeling/bagel/siglip_navit.py", ".to('cuda', torch.int32)", ".to(torch.int32)"),
    ("modeling/bagel/siglip_navit.py", ".to('cuda')", ""),
    ("inferencer.py", "latent.to('cuda', dtype=torch.bfloat16)", "latent"),
]


def prepare(upstream: str | Path) -> dict:
    upstream = Path(upstream)
    marker = upstream / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    for required in ("modeling/bagel/bagel.py", "modeling/bagel/qwen2_navit.py", "modeling/bagel/siglip_navit.py",
                     "modeling/bagel/modeling_utils.py", "modeling/autoencoder.py", "data/data_utils.py",
                     "inferencer.py"):
        if not (upstream / required).is_file():
            raise FileNotFoundError(f"{upstream / required}: not an upstream BAGEL checkout")
    record = {"shims": sorted(SHIMS), "edits": []}
    texts = {}
    for file, old, new in EDITS:
        text = texts.setdefault(file, (upstream / file).read_text())
        count = text.count(old)
        if count == 0:
            raise RuntimeError(f"{file}: expected {old!r} in upstream code; the checkout differs from the one "
                               "these edits were written for")
        texts[file] = text.replace(old, new)
        record["edits"].append({"file": file, "old": old, "new": new, "count": count})
    for file, text in texts.items():
        (upstream / file).write_text(text)
    for rel, source in SHIMS.items():
        path = upstream / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    if not (upstream / "data" / "__init__.py").exists():
        (upstream / "data" / "__init__.py").write_text("")
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(prepare(sys.argv[1]), indent=1))
