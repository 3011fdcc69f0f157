"""COOPER's tool branch (upstream `interleave_reason_tool_condition`) and perception mode
(`image_reason_tool_condition`) on the bundled small checkpoint, with a scripted text generator.

Random weights never write a tag, so `Inferencer.generate_text` is the one test double here: it
returns scripted turns and records the context it was asked to continue. Everything else is real:
the contexts, both CFG contexts, the generated maps, the fed-back map and the reflection prompt.
Each context keeps a log of what was appended to it (token ids, image token counts, RoPE positions);
the expected logs are written out from upstream's routine, and the key/value caches are compared
with contexts built step by step from upstream's routine on the inference primitives.
"""

import dataclasses

import numpy as np
import pytest
import torch

from cooper_model import BUNDLED_CHECKPOINT, CooperPipeline
from cooper_model.pipeline import CooperInputError
from cooper_model import image_processor as ip
from cooper_model import prompts
from cooper_model.codecs import colorize_depth
from cooper_model.config import preset
from cooper_model.inference import Context, ImageGenerationSettings, Inferencer, decode_depth01
from cooper_model.modeling import CooperModel
from cooper_model.autoencoder import FluxAutoencoder
from cooper_model.tokenizer import byte_level_tokenizer

# 64x48 input; VAE side 64x48 (4x3 latent patches), ViT side 70x56 (5x4 patches): upstream's
# resize rule under these limits. A generated map has the VAE side's size.
SMALL = dict(num_steps=2, vae_resolution=64, vit_resolution=70)
VAE_TOKENS = 4 * 3 + 2  # <|vision_start|> patches <|vision_end|>
VIT_TOKENS = 5 * 4 + 2

QUESTION = "Which is nearer, the chair or the table?"
DEPTH_CALL = ("<think>Which is nearer? A depth map helps.</think>\n<depth-estimation>Estimate the depth of the "
              "image and generate the depth map.</depth-estimation>")
DEPTH_CALL_WITHOUT_TOOL = "<think>Which is nearer? A depth map helps.</think>\n"
SEG_CALL = ("<think>Where is each object?</think>\n<segmentation>Segment the objects in the image with different "
            "colors.</segmentation>")
SEG_CALL_WITHOUT_TOOL = "<think>Where is each object?</think>\n"
ANSWER = "<think>The chair is darker in the depth map.</think>\n<answer>The chair. \\boxed{chair}</answer>"
NO_TAG = "<think>I am not sure what to do.</think>"


@pytest.fixture(scope="module")
def pipe():
    loaded = CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT)
    # without the checkpoint's pipeline defaults: COOPER's own settings and token budgets
    return CooperPipeline(loaded.inferencer, dataclasses.replace(loaded.config, pipeline_defaults={}))


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)


# What each context holds ----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def context_logs(monkeypatch):
    """Every context logs what is appended: ("text", ids, first position) or ("vit" | "vae", token
    count, position); a copy starts with its original's log. The primitives still do the work."""
    add_ids, add_vit, add_latent, copy = (Inferencer.add_token_ids, Inferencer.add_vit_image,
                                          Inferencer.add_latent_image, Context.copy)

    def log(ctx):
        return ctx.__dict__.setdefault("log", [])

    def logged_ids(self, ctx, ids):
        log(ctx).append(("text", tuple(ids), ctx.rope))
        return add_ids(self, ctx, ids)

    def logged_image(kind, add):
        def wrapper(self, ctx, pixels):
            entry, length = [kind, None, ctx.rope], ctx.length
            add(self, ctx, pixels)
            entry[1] = ctx.length - length
            log(ctx).append(tuple(entry))
        return wrapper

    def logged_copy(self):
        new = copy(self)
        new.log = list(log(self))
        return new

    monkeypatch.setattr(Inferencer, "add_token_ids", logged_ids)
    monkeypatch.setattr(Inferencer, "add_vit_image", logged_image("vit", add_vit))
    monkeypatch.setattr(Inferencer, "add_latent_image", logged_image("vae", add_latent))
    monkeypatch.setattr(Context, "copy", logged_copy)


@dataclasses.dataclass
class Expected:
    """A context's expected log, length and next RoPE position, from upstream's sequence layout:
    text is <|im_start|> ids <|im_end|> with a position per token; an image's tokens share one
    position and the next item starts one later."""

    tokenizer: object
    log: list = dataclasses.field(default_factory=list)
    length: int = 0
    rope: int = 0

    def text(self, text):
        ids = tuple([self.tokenizer.convert_tokens_to_ids("<|im_start|>")]
                    + self.tokenizer.encode(text, add_special_tokens=False)
                    + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")])
        self.log.append(("text", ids, self.rope))
        self.length += len(ids)
        self.rope += len(ids)
        return self

    def image(self, kind, tokens):
        self.log.append((kind, tokens, self.rope))
        self.length += tokens
        self.rope += 1
        return self

    def copy(self):
        return dataclasses.replace(self, log=list(self.log))


def state(ctx):
    return {"log": list(ctx.log), "length": ctx.length, "rope": ctx.rope, "kv": ctx.kv}


def holds(snapshot, expected: Expected) -> bool:
    return (snapshot["log"], snapshot["length"], snapshot["rope"]) == (expected.log, expected.length, expected.rope)


def same_kv(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def run_scripted(pipe, monkeypatch, rgb, turns, mode="interleave", **overrides):
    """pipe.ask with `generate_text` replaced by the script; records every text request and every
    map request (its three contexts and settings) and the events."""
    requests, maps, events = [], [], []
    real_generate_latents = pipe.inferencer.generate_latents

    def scripted_generate_text(ctx, max_new_tokens=500, do_sample=False, temperature=1.0, top_p=1.0,
                               generator=None, trace=None):
        requests.append(dict(state(ctx), max_new_tokens=max_new_tokens, do_sample=do_sample))
        if len(requests) > len(turns):
            raise AssertionError(f"text requested {len(requests)} times; the script has {len(turns)} turns")
        return turns[len(requests) - 1]

    def recorded_generate_latents(ctx, height, width, settings, cfg_text_ctx=None, cfg_img_ctx=None,
                                  generator=None, noise=None):
        maps.append(dict(ctx=state(ctx), text_free=state(cfg_text_ctx), image_free=state(cfg_img_ctx),
                         settings=settings, size=(height, width)))
        return real_generate_latents(ctx, height, width, settings, cfg_text_ctx, cfg_img_ctx, generator, noise)

    monkeypatch.setattr(pipe.inferencer, "generate_text", scripted_generate_text)
    monkeypatch.setattr(pipe.inferencer, "generate_latents", recorded_generate_latents)
    out = pipe.ask(rgb, QUESTION, mode=mode, on_event=lambda *e: events.append(e), **SMALL, **overrides)
    return out, requests, maps, events


# Interleaved reasoning: the turn loop -----------------------------------------------------------

def test_depth_then_segmentation_then_answer(pipe, monkeypatch, rgb):
    tok = pipe.inferencer.tokenizer
    out, requests, maps, events = run_scripted(pipe, monkeypatch, rgb, [DEPTH_CALL, SEG_CALL, ANSWER])

    assert out.turns == [DEPTH_CALL, SEG_CALL, ANSWER]
    assert out.tools_used == ["depth", "segmentation"] and [k for k, _ in out.images] == ["depth", "segmentation"]
    assert out.answer == ANSWER and out.boxed_answer == "chair"
    assert events == [("turn", DEPTH_CALL), ("tool", "depth"), ("turn", SEG_CALL), ("tool", "segmentation"),
                      ("turn", ANSWER)]
    assert len(requests) == 3 and len(maps) == 2

    # upstream: system prompt and question in both; the image (VAE + ViT) only in the main one
    main = Expected(tok).text(prompts.INTERLEAVE_REASON_SYSTEM_PROMPT).image("vae", VAE_TOKENS) \
        .image("vit", VIT_TOKENS).text(QUESTION)
    image_free = Expected(tok).text(prompts.INTERLEAVE_REASON_SYSTEM_PROMPT).text(QUESTION)
    assert holds(requests[0], main)

    # turn 1 calls depth: text-free = context + the turn without its tool block
    text_free = main.copy().text(DEPTH_CALL_WITHOUT_TOOL)
    main.text(DEPTH_CALL)
    image_free.text(DEPTH_CALL)
    assert holds(maps[0]["ctx"], main) and holds(maps[0]["text_free"], text_free)
    assert holds(maps[0]["image_free"], image_free)
    # the map comes back as ViT tokens only (no VAE copy), then the reflection prompt, in both
    for ctx in (main, image_free):
        ctx.image("vit", VIT_TOKENS).text(prompts.REFLECTION_PROMPT)
    assert holds(requests[1], main)

    # turn 2 calls segmentation
    text_free = main.copy().text(SEG_CALL_WITHOUT_TOOL)
    main.text(SEG_CALL)
    image_free.text(SEG_CALL)
    assert holds(maps[1]["ctx"], main) and holds(maps[1]["text_free"], text_free)
    assert holds(maps[1]["image_free"], image_free)
    for ctx in (main, image_free):
        ctx.image("vit", VIT_TOKENS).text(prompts.REFLECTION_PROMPT)
    assert holds(requests[2], main)

    # maps at the VAE side's size, under COOPER's evaluation settings for question answering
    for m in maps:
        assert m["size"] == (48, 64)
        s = m["settings"]
        assert (s.cfg_text_scale, s.cfg_img_scale, s.cfg_interval, s.cfg_renorm_type) == (4.0, 2.0, (0.0, 1.0), "text_channel")
    assert requests[0]["max_new_tokens"] == 4096 and not requests[0]["do_sample"]

    # The same conversation built from upstream's routine, step by step, on the primitives:
    # every cache and both maps must be identical.
    inf = pipe.inferencer
    vae_t = dataclasses.replace(inf.config.vae_transform, max_size=64, min_size=64)
    vit_t = dataclasses.replace(inf.config.vit_transform, max_size=70, min_size=70)
    settings = ImageGenerationSettings(num_steps=2, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                                       cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
    generator = torch.Generator().manual_seed(0)  # the pipeline's default seed
    with torch.inference_mode():
        image = ip.resize(ip.as_pil_rgb(rgb), vae_t)
        gen, img_ctx = inf.new_context(vae_t, vit_t), inf.new_context(vae_t, vit_t)
        gen.add_text(prompts.INTERLEAVE_REASON_SYSTEM_PROMPT)
        img_ctx.add_text(prompts.INTERLEAVE_REASON_SYSTEM_PROMPT)
        gen.add_image(image, vit=True, vae=True, generator=generator)
        gen.add_text(QUESTION)
        img_ctx.add_text(QUESTION)
        assert same_kv(requests[0]["kv"], gen.kv)
        for n, (turn, without, kind) in enumerate([(DEPTH_CALL, DEPTH_CALL_WITHOUT_TOOL, "depth"),
                                                   (SEG_CALL, SEG_CALL_WITHOUT_TOOL, "segmentation")]):
            txt_ctx = gen.copy().add_text(without)
            gen.add_text(turn)
            img_ctx.add_text(turn)
            assert same_kv(maps[n]["ctx"]["kv"], gen.kv) and same_kv(maps[n]["text_free"]["kv"], txt_ctx.kv)
            assert same_kv(maps[n]["image_free"]["kv"], img_ctx.kv)
            latents = Inferencer.generate_latents(inf, gen, 48, 64, settings, txt_ctx, img_ctx, generator)
            decoded = inf.decode_latents(latents, 48, 64)
            shown = colorize_depth(decode_depth01(decoded).numpy()) if kind == "depth" else ip.to_uint8(decoded)
            assert out.images[n][0] == kind and np.array_equal(out.images[n][1], shown)
            fed = ip.resize(ip.as_pil_rgb(shown), vae_t)
            for ctx in (gen, img_ctx):
                ctx.add_image(fed, vit=True, vae=False)
                ctx.add_text(prompts.REFLECTION_PROMPT)
            assert same_kv(requests[n + 1]["kv"], gen.kv)


def test_depth_map_is_fed_back_in_spectral_colours(pipe, monkeypatch, rgb):
    out, _, _, _ = run_scripted(pipe, monkeypatch, rgb, [DEPTH_CALL, ANSWER])
    kind, shown = out.images[0]
    assert kind == "depth" and shown.shape == (48, 64, 3) and shown.dtype == np.uint8
    # every pixel is a Spectral colour: the model sees a coloured map, not the grey target
    spectral = colorize_depth(np.linspace(0, 1, 4096, dtype=np.float32)[None])[0]
    assert set(map(tuple, shown.reshape(-1, 3))) <= set(map(tuple, spectral))
    assert not (shown[..., 0] == shown[..., 2]).all()


def test_at_most_max_turns_and_the_last_call_is_not_run(pipe, monkeypatch, rgb):
    out, requests, maps, _ = run_scripted(pipe, monkeypatch, rgb, [DEPTH_CALL, SEG_CALL, DEPTH_CALL], max_turns=2)
    # upstream checks the turn count before the tools: turn 2's segmentation call is not run
    assert out.turns == [DEPTH_CALL, SEG_CALL] and out.tools_used == ["depth"]
    assert len(requests) == 2 and len(maps) == 1
    assert out.answer == SEG_CALL.strip() and out.boxed_answer is None


def test_answer_first_runs_no_tool(pipe, monkeypatch, rgb):
    out, requests, maps, _ = run_scripted(pipe, monkeypatch, rgb, [ANSWER, DEPTH_CALL])
    assert out.turns == [ANSWER] and out.tools_used == [] and maps == [] and len(requests) == 1


def test_depth_wins_when_a_turn_calls_both_tools(pipe, monkeypatch, rgb):
    both = "<think>Both.</think>\n" + prompts.SEGMENTATION_PROMPT + prompts.DEPTH_PROMPT
    out, _, maps, _ = run_scripted(pipe, monkeypatch, rgb, [both, ANSWER])
    assert out.tools_used == ["depth"]  # upstream: `if depth_match ... elif segmentation_match`
    tok = pipe.inferencer.tokenizer
    # only the depth block leaves the text-free context
    expected_tail = Expected(tok).text("<think>Both.</think>\n" + prompts.SEGMENTATION_PROMPT).log[-1][1]
    assert maps[0]["text_free"]["log"][-1][1] == expected_tail


def test_turn_without_a_tag(pipe, monkeypatch, rgb):
    # greedy: the same context would give the same turn again, so the loop stops after it
    out, requests, maps, _ = run_scripted(pipe, monkeypatch, rgb, [NO_TAG])
    assert out.turns == [NO_TAG] and len(requests) == 1 and maps == []
    # sampling: upstream asks again from the unchanged context until the turn limit
    out, requests, maps, _ = run_scripted(pipe, monkeypatch, rgb, [NO_TAG, NO_TAG, ANSWER], do_sample=True)
    assert out.turns == [NO_TAG, NO_TAG, ANSWER] and maps == []
    assert requests[0]["log"] == requests[1]["log"] == requests[2]["log"]
    assert requests[0]["kv"] is requests[2]["kv"] and all(r["do_sample"] for r in requests)


# Perception mode (BAGEL-PE) ----------------------------------------------------------------------

def test_perception_mode_contexts_and_budget(pipe, monkeypatch, rgb):
    tok = pipe.inferencer.tokenizer
    out, requests, maps, _ = run_scripted(pipe, monkeypatch, rgb, ["The chair. \\boxed{chair}</answer>"],
                                          mode="perception")
    assert out.tools_used == ["depth", "segmentation"] and len(maps) == 2 and len(requests) == 1
    assert out.answer == "<answer>The chair. \\boxed{chair}</answer>"
    assert requests[0]["max_new_tokens"] == 256  # the evaluation config's BAGEL-PE max_think_token_n

    main = Expected(tok).text(prompts.IMAGE_REASON_SYSTEM_PROMPT).image("vae", VAE_TOKENS) \
        .image("vit", VIT_TOKENS).text(QUESTION)
    image_free = Expected(tok).text(prompts.IMAGE_REASON_SYSTEM_PROMPT).text(QUESTION)
    for m, prompt in zip(maps, (prompts.DEPTH_PROMPT, prompts.SEGMENTATION_PROMPT)):
        text_free = main.copy()  # upstream: the context before the tool prompt
        main.text(prompt)
        image_free.text(prompt)
        assert holds(m["ctx"], main) and holds(m["text_free"], text_free) and holds(m["image_free"], image_free)
        for ctx in (main, image_free):
            ctx.image("vit", VIT_TOKENS)  # fed back as ViT tokens, no reflection prompt
    assert holds(requests[0], main.text("<answer>"))


def test_given_maps_are_shown_instead_of_generated(pipe, monkeypatch, rgb):
    """A depth camera's map (or the ground truth, in an evaluation) answers the tool call: nothing
    is generated, the map is shown coloured as a generated one would be, and it is reported."""
    h, w = rgb.shape[:2]
    depth_m = np.linspace(0.5, 6.0, h * w, dtype=np.float32).reshape(h, w)
    depth_m[0, :5] = np.nan  # unknown pixels (no sensor return) are allowed
    labels = (np.arange(h * w).reshape(h, w) // (h * w // 3)).clip(0, 2)
    out, requests, maps, events = run_scripted(pipe, monkeypatch, rgb, [DEPTH_CALL, SEG_CALL, ANSWER],
                                               depth_m=depth_m, labels=labels)
    assert maps == [] and "denoise" not in out.timings  # no map was generated
    assert out.tools_used == ["depth", "segmentation"] and [v for k, v in events if k == "tool"] == out.tools_used
    shown = dict(out.images)
    assert np.array_equal(shown["depth"], colorize_depth(pipe.depth_codec.normalize(depth_m)))
    assert np.array_equal(pipe.segmentation_codec.decode(shown["segmentation"]), labels)
    # only the kind given is replaced: without labels the segmentation is generated
    out, _, maps, _ = run_scripted(pipe, monkeypatch, rgb, [DEPTH_CALL, SEG_CALL, ANSWER], depth_m=depth_m)
    assert out.tools_used == ["depth", "segmentation"] and len(maps) == 1
    with pytest.raises(CooperInputError, match="depth map is"):
        pipe.ask(rgb, QUESTION, depth_m=depth_m[1:], **SMALL)


def test_token_budget_per_mode(pipe, monkeypatch, rgb):
    _, requests, _, _ = run_scripted(pipe, monkeypatch, rgb, ["x</answer>"], mode="perception", max_new_tokens=1000)
    assert requests[0]["max_new_tokens"] == 1000  # a call's own budget is kept
    _, requests, _, _ = run_scripted(pipe, monkeypatch, rgb, [ANSWER], mode="text")
    assert requests[0]["max_new_tokens"] == 4096
    # a checkpoint's smaller default stays smaller
    small = CooperPipeline(pipe.inferencer, dataclasses.replace(pipe.config, pipeline_defaults={"max_new_tokens": 96}))
    _, requests, _, _ = run_scripted(small, monkeypatch, rgb, ["x</answer>"], mode="perception")
    assert requests[0]["max_new_tokens"] == 96


# Next-token choice ---------------------------------------------------------------------------------

def test_next_token_is_never_a_padding_row():
    # lm_head has more rows than the tokenizer has tokens (BAGEL-7B: 152,064 vs 151,665). Make every
    # padding row outscore every real token: the choice must still be a real token.
    torch.manual_seed(0)
    config = preset("bagel-tiny")
    model = CooperModel(config).eval()
    tokenizer = byte_level_tokenizer()
    real = len(tokenizer)
    assert config.llm.vocab_size > real
    with torch.no_grad():
        model.language_model.lm_head.weight[:real] = 0  # every real token scores 0
        model.language_model.lm_head.weight[real:] = torch.randn(config.llm.vocab_size - real, config.hidden_size)
    inf = Inferencer(model, FluxAutoencoder(config.vae).eval(), tokenizer)
    assert inf.text_vocab_size == real
    ctx = inf.new_context()
    inf.add_text(ctx, "hello")
    with torch.no_grad():
        unrestricted = model.logits(inf._decode_step(ctx.copy(), inf.tokens.bos)[-1])
    assert int(unrestricted.argmax()) >= real  # without the restriction a padding id would win

    for do_sample in (False, True):
        trace = {}
        inf.generate_text(ctx, max_new_tokens=6, do_sample=do_sample, temperature=1.0,
                          generator=torch.Generator().manual_seed(1), trace=trace)
        assert trace["ids"] and all(i < real for i in trace["ids"])
        # log-probabilities of the distribution over real tokens only: uniform here
        np.testing.assert_allclose(trace["logprobs"], np.log(1 / real), rtol=1e-5)
