"""Splitting the model over placement groups (`device_map`), on CPU.

A layer on a second GPU receives its input on that GPU (accelerate's hooks move tensors) but the
one `Routing` of the pass, a plain dataclass the hooks do not move, was built on the first device.
Here: the routing hands each layer indices on its input's device, and a model split into two
placement groups with accelerate hooks gives the same results as the unsplit model.
"""

import numpy as np
import pytest
import torch
from accelerate import dispatch_model

from cooper_model import prompts
from cooper_model.checkpoint import load_model, read_config, resolve_device_map
from cooper_model.modeling import CooperModel, Routing
from cooper_model.pipeline import BUNDLED_CHECKPOINT, CooperPipeline


def test_routing_indices_follow_the_input_device():
    gen_mask = torch.tensor([False, True, True, True, False])
    routing = Routing.from_gen_mask(gen_mask)
    und, gen = routing.indices(torch.device("cpu"))
    assert und is routing.und and gen is routing.gen  # already there: no copy
    other = torch.device("meta")  # stands for the second GPU of a device map
    und_m, gen_m = routing.indices(other)
    assert und_m.device == gen_m.device == other
    assert routing.indices(other)[1] is gen_m  # copied once per device, then reused
    x = torch.empty(5, 8, device=other)
    out = routing.apply(x, lambda t: t * 2, lambda t: t + 1)
    assert out.device == other and out.shape == (5, 8)
    x = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(routing.apply(x, lambda t: -t, lambda t: t), torch.tensor(
        [[-0.0, -1.0], [2, 3], [4, 5], [6, 7], [-8, -9]]))


def two_groups(model: CooperModel) -> dict:
    """Layers split in halves; embeddings, heads and tables with the first half, the ViT with it."""
    n = len(model.language_model.model.layers)
    first = {f"language_model.model.layers.{i}": "cpu" for i in range(n // 2)}
    second = {f"language_model.model.layers.{i}": "cpu" for i in range(n // 2, n)}
    rest = {name: "cpu" for name in ("language_model.model.embed_tokens", "language_model.model.norm",
                                     "language_model.model.norm_moe_gen", "language_model.lm_head", "time_embedder",
                                     "vae2llm", "llm2vae", "latent_pos_embed", "vit_model", "connector",
                                     "vit_pos_embed")}
    return {**rest, **first, **second}


def test_two_placement_groups_with_hooks_match_the_unsplit_model():
    whole = CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT)
    device_map = two_groups(whole.inferencer.model)
    split = CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT, device_map=device_map)
    model = split.inferencer.model
    # accelerate adds no hooks when every group is on one device; force them, as on two GPUs
    dispatch_model(model, device_map=device_map, force_hooks=True)
    layers = model.language_model.model.layers
    assert all(hasattr(layer, "_hf_hook") for layer in layers)
    head = 0.1 * torch.randn(model.llm2vae.weight.shape, generator=torch.Generator().manual_seed(0))
    for pipe in (whole, split):  # llm2vae starts at zero (untrained): the same non-zero head for both
        with torch.no_grad():
            pipe.inferencer.model.llm2vae.weight.copy_(head)
    rgb = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    outs = [p.depth(rgb, num_steps=3, cfg_interval=(0.0, 1.0)) for p in (whole, split)]
    assert outs[0].relative.std() > 0
    assert np.abs(outs[0].relative - outs[1].relative).max() < 1e-5
    inf_w, inf_s = whole.inferencer, split.inferencer
    with torch.inference_mode():
        cw, cs = inf_w.new_context().add_text(prompts.DEPTH_PROMPT), inf_s.new_context().add_text(prompts.DEPTH_PROMPT)
        assert torch.allclose(cw.kv[-1][0], cs.kv[-1][0], atol=1e-6)


def test_device_map_forms():
    path = BUNDLED_CHECKPOINT
    config = read_config(path)
    with torch.device("meta"):
        model = CooperModel(config)
    auto = resolve_device_map(model, "auto")
    assert set(auto.values()) <= {"cpu", "disk", 0} | set(range(8))
    resolved = resolve_device_map(model, two_groups(model))
    assert resolved == two_groups(model)
    incomplete = dict(two_groups(model))
    incomplete.pop("vit_model")
    with pytest.raises(ValueError, match="placed nowhere.*vit_model"):
        resolve_device_map(model, incomplete)
    with pytest.raises(ValueError, match="unknown modules.*'decoder'"):
        resolve_device_map(model, {**two_groups(model), "decoder": "cpu"})
    with pytest.raises(ValueError, match="None, 'auto' or a dict"):
        resolve_device_map(model, "balanced")
    loaded = load_model(path, config, device_map="auto")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
