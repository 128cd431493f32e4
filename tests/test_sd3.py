"""The SD 3 design: tiny-sd3's training (flow matching, the empty T5 slots as one key, resume), joint
attention traced in its four parts, concept tokens (ConceptAttention), and edits through joint attention.

Random-weight SD 3 pipelines (``sdlens.models.families.sd3``) stand in where the shipped weights are
not needed; the references are computed another way (explicit softmax from the layer's own
projections, the full 256-slot text input, an uninterrupted run).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _weights import give_weights

import sdlens
import sdlens.edit
from sdlens.errors import CaptureError, EditError
from sdlens.models import mmdit
from sdlens.models.families import sd3

KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=64, width=64)


@pytest.fixture(scope="module")
def pipe():
    """A random SD 3 pipeline whose transformer's zero-initialised output layers are given weights, so
    that attention changes the picture (a zero output layer would hide any error)."""
    p = sd3()
    give_weights(p.transformer, 0.05)
    return p


def generate(pipe, prompt="a red circle on the left", seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


# ------------------------------------------------------------------ training


def small_config(**kw) -> mmdit.Sd3Config:
    return mmdit.Sd3Config(layers=2, heads=2, head_dim=8, text_width=16, text_width_2=8, **kw)


def test_one_zero_slot_computes_what_the_256_do():
    """The training processor (one zero slot whose logit counts 256 times) gives the transformer's output
    and gradients of the real input with 256 zero slots, run by diffusers' own joint processor."""
    cfg = small_config()
    torch.manual_seed(0)
    transformer = mmdit.build_transformer(cfg)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    slots = torch.randn(2, cfg.text_slots, 24)
    pooled = torch.randn(2, 24)
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([200.0, 800.0])

    def run(context):
        transformer.zero_grad()
        out = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=context,
                          pooled_projections=pooled).sample
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in transformer.parameters()]

    full, full_grads = run(torch.cat([slots, torch.zeros(2, cfg.t5_slots, 24)], dim=1))
    mmdit.use_repeated_zero_slot(transformer, cfg.t5_slots)
    one, one_grads = run(mmdit.with_zero_slot(slots))
    torch.testing.assert_close(one, full, rtol=1e-4, atol=1e-5)
    for a, b in zip(one_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_prompt_cache_is_the_pipelines_encoding(pipe):
    """The cached training embeddings are what the pipeline feeds the transformer for the same caption."""
    cfg = mmdit.Sd3Config(text_slots=77, text_width=32, text_width_2=32)
    cache = mmdit.PromptCache(pipe, cfg)
    slots, pooled = cache(["a red circle", ""], "cpu")
    embeds, _, pooled_ref, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False)
    torch.testing.assert_close(slots[0], embeds[0, :77])
    torch.testing.assert_close(pooled[0], pooled_ref[0])
    assert slots.shape == (2, 77, pipe.transformer.config.joint_attention_dim)


def test_word_slots_outweigh_the_context_embedders_bias():
    """The slots SD 3 reads from one-layer CLIPs are their token + position embeddings; drawn at
    ``text_embedding_std`` they differ from slot to slot after the context embedder (whose bias, the
    same for every slot, is all an empty T5 slot becomes), as they did not at CLIP's own 0.02."""
    def slot_similarity(std):
        cfg = mmdit.Sd3Config(text_embedding_std=std)
        encoders = mmdit.build_text_encoders(cfg)
        ids = mmdit.build_tokenizer(cfg)(["a red circle on the left"], padding="max_length",
                                          max_length=cfg.text_slots, return_tensors="pt").input_ids
        with torch.no_grad():
            slots = torch.cat([e(ids, output_hidden_states=True).hidden_states[-2] for e in encoders], -1)
            torch.manual_seed(0)
            context = mmdit.build_transformer(cfg).context_embedder(slots[0, 1:7])  # the six words
        normed = torch.nn.functional.layer_norm(context, context.shape[-1:])
        cos = torch.nn.functional.cosine_similarity(normed[:, None], normed[None], dim=-1)
        return slots[0, 1:7].std().item(), cos[~torch.eye(6, dtype=bool)].mean().item()

    std, similarity = slot_similarity(1.0)
    assert 1.0 < std < 2.0  # token + position, each of std 1: about sqrt(2)
    assert similarity < 0.3
    old_std, old_similarity = slot_similarity(0.02)
    assert old_similarity > 0.8  # what the first runs' transformers saw: six nearly equal words
    with pytest.raises(sdlens.errors.ModelError, match="text_embedding_std"):
        mmdit.Sd3Config(text_embedding_std=0)


def train(tmp_path, name, cfg=None, **kw):
    from sdlens.models.train import Budget

    return mmdit.train_tiny_sd3(tmp_path / name, cfg or small_config(), budget=Budget(steps=4, batch_size=4, lr=1e-3,
                                warmup_steps=1), progress=False, log_every=1, device="cpu", **kw)


def transformer_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def text_encoder_weights(folder):
    from safetensors.torch import load_file

    return {f"{sub}.{k}": v for sub in ("text_encoder", "text_encoder_2")
            for k, v in load_file(folder / sub / "model.safetensors").items()}


@pytest.mark.slow
@pytest.mark.parametrize("context_layers", [0, 1])
def test_resumed_training_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, context_layers):
    """With context layers the text encoders train too: their weights must resume as well."""
    from sdlens.models import train as train_module

    cfg = small_config(text_context_layers=context_layers)
    whole = train(tmp_path, "whole", cfg)
    record = json.loads((whole / "training.json").read_text())
    assert record["arch"] == "sd3" and record["stages"]["transformer"]["steps"] == 4

    original = train_module.StageLoop.end_step

    def stop_after_two(self, loss):
        original(self, loss)
        if self.step == 2:
            self.save()
            raise KeyboardInterrupt  # the session ends mid-run

    monkeypatch.setattr(train_module.StageLoop, "end_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "cut", cfg)
    monkeypatch.setattr(train_module.StageLoop, "end_step", original)
    resumed = train(tmp_path, "cut", cfg, resume=True)
    for weights in (transformer_weights, text_encoder_weights):
        a, b = weights(whole), weights(resumed)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert json.loads((resumed / "training.json").read_text())["stages"]["transformer"]["steps_this_run"] == 2

    pipe = sdlens.load_pipeline(str(resumed))  # the folder is a StableDiffusion3Pipeline, loaded offline
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.tokenizer.model_max_length == 32
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_pooled_dropout_withholds_the_pooled_vector(tmp_path, monkeypatch):
    """--pooled-dropout 1: every training step sees the empty prompt's pooled vector (the slots stay)."""
    seen = []
    original = mmdit.flow_matching_loss

    def spy(transformer, latents, slots, pooled, cfg, generator):
        seen.append(pooled.clone())
        return original(transformer, latents, slots, pooled, cfg, generator)

    monkeypatch.setattr(mmdit, "flow_matching_loss", spy)
    out = train(tmp_path, "pd", small_config(pooled_dropout=1.0, pooled_input=True))
    assert len(seen) == 4 and json.loads((out / "training.json").read_text())["config"]["pooled_dropout"] == 1.0
    empty = seen[0][:1]
    for pooled in seen:
        torch.testing.assert_close(pooled, empty.expand_as(pooled))
    with pytest.raises(sdlens.errors.ModelError, match="pooled_dropout"):
        small_config(pooled_dropout=1.5)


def test_color_word_dropout_zeroes_the_colour_slots_only(tmp_path, monkeypatch):
    """--color-word-dropout 1: every colour word's slot reaches the transformer as the zero slot, every
    other slot (the noun's, which a context layer fills with the colour too) as the pipeline encodes it."""
    from sdlens.cli import build_parser
    from sdlens.world.scene import COLORS

    seen = []
    original, cache_call = mmdit.flow_matching_loss, mmdit.PromptCache.__call__

    def spy_cache(self, captions, device):
        out = cache_call(self, captions, device)
        seen.append({"captions": list(captions), "encoded": out[0].detach().clone()})
        return out

    def spy_loss(transformer, latents, slots, pooled, cfg, generator):
        if len(slots) == len(seen[-1]["captions"]):
            seen[-1]["given"] = slots.detach().clone()
        return original(transformer, latents, slots, pooled, cfg, generator)

    monkeypatch.setattr(mmdit.PromptCache, "__call__", spy_cache)
    monkeypatch.setattr(mmdit, "flow_matching_loss", spy_loss)
    cfg = small_config(color_word_dropout=1.0, text_context_layers=1)
    out = train(tmp_path, "cd", cfg)
    assert json.loads((out / "training.json").read_text())["config"]["color_word_dropout"] == 1.0
    tokenizer = mmdit.build_tokenizer(cfg)
    color_ids = {tokenizer(c, add_special_tokens=False).input_ids[0] for c in COLORS}
    n_colors = 0
    for step in seen:
        assert "given" in step
        given, encoded = step["given"][:, :-1], step["encoded"]  # without the one zero T5 slot
        for caption, g, e in zip(step["captions"], given, encoded):
            ids = tokenizer(caption, padding="max_length", max_length=cfg.text_slots).input_ids
            color = torch.tensor([i in color_ids for i in ids])
            assert int(color.sum()) == sum(w in COLORS for w in caption.split())
            n_colors += int(color.sum())
            assert not g[color].any()
            torch.testing.assert_close(g[~color], e[~color], rtol=0, atol=0)
            assert e[color].abs().sum(-1).gt(0).all()  # the encoder did give them something
    assert n_colors > 0
    parse = build_parser().parse_args
    assert parse(["train-tiny", "--arch", "sd3", "--out", "x", "--color-word-dropout", "0.5"]).color_word_dropout == 0.5
    with pytest.raises(sdlens.errors.ModelError, match="color_word_dropout"):
        small_config(color_word_dropout=-0.1)


def test_without_pooled_input_the_pooled_vector_changes_nothing(tmp_path):
    """--no-pooled-input: the trained and exported transformer gives the same output whatever the pooled vector."""
    assert mmdit.Sd3Config().pooled_input is False  # the shipped model's default
    from sdlens.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train-tiny", "--arch", "sd3", "--out", "x"]).pooled_input is False
    assert parse(["train-tiny", "--arch", "sd3", "--out", "x", "--pooled-input"]).pooled_input is True
    out = train(tmp_path, "np", small_config())
    assert json.loads((out / "training.json").read_text())["config"]["pooled_input"] is False
    assert float(transformer_weights(out)["time_text_embed.text_embedder.linear_1.weight"].abs().max()) == 0.0
    pipe = sdlens.load_pipeline(str(out))
    t = pipe.transformer.float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 8, t.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        a, b = (t(x, encoder_hidden_states=ctx, pooled_projections=torch.randn(1, t.config.pooled_projection_dim,
                                                                                generator=g),
                  timestep=torch.tensor([500.0])).sample for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_context_layers_start_as_the_identity_and_only_they_train(tmp_path, capsys):
    """--text-context-layers 1: the slots start as the frozen encoders' own (weights trained without
    context layers load unchanged); training moves the context layers and nothing else of the encoders;
    the export is SD 3's pipeline with two-layer CLIPs, and a checkpoint exports to the same weights."""
    from safetensors.torch import load_file

    plain, ctx = small_config(), small_config(text_context_layers=1)
    frozen, fresh = mmdit.build_text_encoders(plain), mmdit.build_text_encoders(ctx)
    caption = "a red circle on the left and a blue square on the right"
    for a, b in zip(frozen, fresh):
        ids = mmdit.build_tokenizer(plain)([caption], padding="max_length", max_length=32, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(a(ids, output_hidden_states=True).hidden_states[-2],
                                       b(ids, output_hidden_states=True).hidden_states[-2], rtol=0, atol=0)
        trainable = {n.split(".")[3] for n, p in b.named_parameters() if p.requires_grad}
        assert trainable == {"0"} and b.config.num_hidden_layers == 2
    with pytest.raises(sdlens.errors.ModelError, match="text_context_layers"):
        small_config(text_context_layers=-1)

    out = train(tmp_path, "ctx", ctx)
    assert json.loads((out / "training.json").read_text())["config"]["text_context_layers"] == 1
    for sub, seeded in zip(("text_encoder", "text_encoder_2"), fresh):
        weights = load_file(out / sub / "model.safetensors")
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        assert float(weights["encoder.layers.0.mlp.fc2.weight"].abs().max()) > 0  # trained away from zero
        reference = seeded.text_model.state_dict()
        for key in ("encoder.layers.1.mlp.fc1.weight", "encoder.layers.1.self_attn.q_proj.weight"):
            torch.testing.assert_close(weights[key].float(), reference[key].half().float(), rtol=0, atol=0)
    pipe = sdlens.load_pipeline(str(out))
    assert pipe.text_encoder.config.num_hidden_layers == 2
    image = pipe(caption, num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()
    again = mmdit.export_checkpoint(out, tmp_path / "from-checkpoint")
    for sub in ("text_encoder", "text_encoder_2"):
        a, b = load_file(out / sub / "model.safetensors"), load_file(again / sub / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

    # --init-from: an exported folder's encoders load where their layers match (a run continued); a
    # folder holding the transformer alone leaves the seed's encoders, context layers at the identity
    loaded = mmdit.init_text_encoders_from(out, mmdit.build_text_encoders(ctx))
    saved = load_file(out / "text_encoder" / "model.safetensors")
    state = loaded[0].state_dict()
    for k, v in saved.items():  # the file's keys all carry "text_model." (how SD 3's folders store them)
        torch.testing.assert_close(state[k if k in state else k.removeprefix("text_model.")].half(), v,
                                   rtol=0, atol=0)
    assert [p.requires_grad for p in loaded[0].parameters()] == [p.requires_grad for p in fresh[0].parameters()]
    shutil.copytree(out / "transformer", tmp_path / "transformer-only" / "transformer")
    kept = mmdit.init_text_encoders_from(tmp_path / "transformer-only", mmdit.build_text_encoders(ctx))
    for a, b in zip(kept, fresh):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    plain = mmdit.build_text_encoders(small_config())  # no context layers: the export's do not fit, and it says so
    capsys.readouterr()
    unchanged = mmdit.init_text_encoders_from(out, plain)
    assert "context layers start as the identity" in capsys.readouterr().err
    for a, b in zip(unchanged, mmdit.build_text_encoders(small_config())):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    continued = train(tmp_path, "continued", ctx, init_from=out)
    assert json.loads((continued / "training.json").read_text())["config"]["text_context_layers"] == 1


# ------------------------------------------------------------------ tracing joint attention


def test_tracing_leaves_the_image_unchanged(pipe):
    plain = generate(pipe)
    with sdlens.trace(pipe, self_attn=True, text_attn=True, concepts=["circle", "red", "background"],
                      dtype=torch.float32) as tr:
        traced = generate(pipe)
    np.testing.assert_array_equal(traced, plain)  # concept tokens and all: bit for bit
    assert set(tr.kinds) == {"cross", "self", "text_image", "text_text", "concept", "concept_image"}
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())


def explicit_joint_probs(attn, image, text):
    """Softmax over [image; text] keys of [image; text] queries, from the layer's projections, by hand."""
    heads = attn.heads

    def split(x):
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)

    q = torch.cat([split(attn.to_q(image)), split(attn.add_q_proj(text))], dim=2)
    k = torch.cat([split(attn.to_k(image)), split(attn.add_k_proj(text))], dim=2)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1)


def test_joint_maps_are_the_explicit_softmax_split_in_four(pipe):
    """Each block's four parts, put back together, are the softmax recomputed from the block's inputs."""
    inputs = {}

    def grab(name):
        def hook(module, args, kwargs):
            inputs[name] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        return hook

    blocks = {n: m for n, m in pipe.transformer.named_modules() if n.endswith(".attn")}
    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in blocks.items()]
    try:
        with sdlens.trace(pipe, self_attn=True, text_attn=True, heads="all", dtype=torch.float32, steps=[-1]) as tr:
            generate(pipe)
    finally:
        for h in handles:
            h.remove()
    for name, attn in blocks.items():
        image, text = inputs[name]  # the last step's inputs (both CFG halves): keep the conditional row
        with torch.no_grad():
            ref = explicit_joint_probs(attn, image[1:], text[1:])[0]  # (heads, Nq, Nk)
        n = image.shape[1]
        got = torch.cat([torch.cat([tr.maps(name, "self")[0, 0].flatten(1, 2), tr.maps(name, "cross")[0, 0].flatten(1, 2)], -1),
                         torch.cat([tr.maps(name, "text_image")[0, 0].flatten(-2), tr.maps(name, "text_text")[0, 0]], -1)], 1)
        assert got.shape == ref.shape and n == 256
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-4)  # rows sum to 1


def test_text_and_concept_views(pipe, tmp_path):
    concepts = ["circle", "red", "background"]
    with sdlens.trace(pipe, text_attn=True, concepts=concepts, dtype=torch.float32) as tr:
        generate(pipe)
    assert tr.text_map("circle").shape == (64, 64)
    t = tr.text_matrix()
    assert t.shape == (333, 333)  # 77 CLIP slots + 256 T5 slots (zeros: no T5 here)
    total = sum(tr.concept_map(c) for c in concepts)
    torch.testing.assert_close(total, torch.ones(64, 64), rtol=0, atol=1e-4)  # a softmax over the concepts
    raw = tr.concept_map("circle", softmax=False)
    assert raw.shape == (64, 64) and not torch.allclose(raw, tr.concept_map("circle"))
    with pytest.raises(CaptureError, match="traced concepts"):
        tr.concept_map("square")
    saved = sdlens.load_trace(tr.save(tmp_path / "trace"))
    assert saved.concepts == concepts
    torch.testing.assert_close(saved.concept_map("red"), tr.concept_map("red"))


def test_word_map_directions_are_the_two_halves_and_their_agreement(pipe):
    """direction="text_image" is the word's own rows over the image; "both" the geometric mean of the
    two min-max normalised maps; both recomputed here from the stored tensors."""
    with sdlens.trace(pipe, text_attn=True, dtype=torch.float32) as tr:
        generate(pipe, prompt="a red circle on the left")
    slots = tr.tokenization().word_tokens[tr.word_index("circle")]
    per_layer = []
    for name in tr.layers_of("text_image"):
        x = tr.maps(name, "text_image")[:, 0][:, :, slots].float().mean(dim=(0, 1, 2))  # (h, w)
        per_layer.append(torch.nn.functional.interpolate(x[None, None], size=(64, 64), mode="bilinear",
                                                         align_corners=False)[0, 0])
    words = torch.stack(per_layer).mean(0)
    torch.testing.assert_close(tr.word_map("circle", direction="text_image"), words, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tr.word_map("circle", direction="text_image"), tr.text_map("circle"))
    pixels = tr.word_map("circle")  # the default: image -> text
    torch.testing.assert_close(pixels, tr.word_map("circle", direction="image_text"))

    def unit(m):
        return (m - m.min()) / (m.max() - m.min())

    both = tr.word_map("circle", direction="both")
    torch.testing.assert_close(both, (unit(pixels) * unit(words)).sqrt(), rtol=1e-5, atol=1e-6)
    assert float(both.min()) >= 0 and float(both.max()) <= 1 + 1e-6
    # where one direction is 0 (its minimum), "both" is 0: the two must agree
    assert float(both.flatten()[int(pixels.argmin())]) == 0.0
    with pytest.raises(CaptureError, match="'image_text', 'text_image', 'both'"):
        tr.word_map("circle", direction="image->text")
    with sdlens.trace(pipe, dtype=torch.float32) as plain:
        generate(pipe)
    with pytest.raises(CaptureError, match="text_attn=True"):
        plain.word_map("circle", direction="both")


def test_concept_rows_are_the_probabilities_concept_attention_weighs_by():
    """concept_probs: each concept query's softmax over the image's keys and the concepts', the weights
    that concept_attention's SDPA gives their values."""
    from sdlens.hooks.attention import JointInputs, concept_attention, concept_probs

    g = torch.Generator().manual_seed(0)
    b, heads, n_img, n_txt, c, d = 2, 3, 10, 4, 2, 8
    q, k, v = (torch.randn(b, heads, n_img + n_txt, d, generator=g) for _ in range(3))
    cq, ck, cv = (torch.randn(b, heads, c, d, generator=g) for _ in range(3))
    inputs = JointInputs(q, k, v, n_img, (cq, ck, cv))
    p = concept_probs(inputs)
    assert p.shape == (b, heads, c, n_img + c)
    torch.testing.assert_close(p.sum(-1), torch.ones(b, heads, c))
    by_hand = (cq @ torch.cat([k[:, :, :n_img], ck], 2).transpose(-1, -2) / d ** 0.5).softmax(-1)
    torch.testing.assert_close(p, by_hand)
    torch.testing.assert_close(p @ torch.cat([v[:, :, :n_img], cv], 2), concept_attention(inputs), rtol=1e-5, atol=1e-6)


def test_concept_maps_in_attention_space(pipe, tmp_path):
    """space="attention": the mean over steps of the stored concept rows, layers upsampled and averaged;
    each row's image part is a share of the concept's attention (between 0 and 1 summed over the image)."""
    concepts = ["circle", "red", "background"]
    with sdlens.trace(pipe, concepts=concepts, dtype=torch.float32) as tr:
        generate(pipe)
    assert "concept_image" in tr.kinds
    per_layer = []
    for name in tr.layers_of("concept_image"):
        rows = tr.maps(name, "concept_image")[:, 0, 0]  # (steps, h, w, C)
        total = rows.sum(dim=(1, 2))  # each concept's attention on the image, per step
        assert bool((total > 0).all()) and bool((total < 1 + 1e-5).all())
        x = rows[..., 0].mean(0)
        per_layer.append(torch.nn.functional.interpolate(x[None, None], size=(64, 64), mode="bilinear",
                                                         align_corners=False)[0, 0])
    torch.testing.assert_close(tr.concept_map("circle", space="attention"), torch.stack(per_layer).mean(0),
                               rtol=1e-5, atol=1e-7)
    assert not torch.allclose(tr.concept_map("circle", space="attention"), tr.concept_map("circle"))
    with pytest.raises(CaptureError, match="'output', 'attention'"):
        tr.concept_map("circle", space="outputs")
    saved = sdlens.load_trace(tr.save(tmp_path / "trace"))
    torch.testing.assert_close(saved.concept_map("red", space="attention"), tr.concept_map("red", space="attention"))
    older = saved.replace(kinds=("cross", "concept"))  # as a trace saved before the rows were kept
    older.concept_map("red")
    with pytest.raises(CaptureError, match="no concept_image maps"):
        older.concept_map("red", space="attention")


def test_concept_scores_are_output_dot_products():
    hidden = torch.randn(2, 3, 10 + 4 + 2, 5)  # (b, heads, image 10 + text 4 + concepts 2, d)
    from sdlens.capture.concepts import concept_scores

    got = concept_scores(hidden, 10, 2)
    image = hidden[:, :, :10].permute(0, 2, 1, 3).reshape(2, 10, 15)
    concepts = hidden[:, :, -2:].permute(0, 2, 1, 3).reshape(2, 2, 15)
    torch.testing.assert_close(got, torch.einsum("bnc,bkc->bnk", image, concepts))


def test_bad_concepts_are_refused_before_running(pipe, sd1_pipe):
    for bad in ([], [""], ["circle", "circle"], [3]):
        with pytest.raises(CaptureError, match="concepts"):
            sdlens.trace(pipe, concepts=bad)
    with pytest.raises(CaptureError, match="joint attention"), sdlens.trace(sd1_pipe, concepts=["circle"]):
        sd1_pipe("a red circle", num_inference_steps=2, output_type="np")
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in sd1_pipe.unet.attn_processors.values())


# ------------------------------------------------------------------ editing through joint attention


def test_replace_copies_the_bases_word_distribution(pipe):
    r = sdlens.edit.replace(pipe, "a red circle", "a blue circle", seed=0, trace={"dtype": torch.float32}, **KW)
    plain = pipe("a red circle", generator=torch.Generator("cpu").manual_seed(0), **KW).images[0]
    np.testing.assert_allclose(r.images[0], plain, atol=1e-5)  # the base branch is a plain generation
    assert np.abs(r.images[1] - r.images[0]).max() > 1e-3  # the edit changed the picture
    for layer in r.trace.layers_of("cross"):
        m = r.trace.maps(layer)  # (steps, rows, 1, h, w, keys): base, edited
        base, edited = m[:, 0, ..., :77], m[:, 1, ..., :77]
        torch.testing.assert_close(edited / edited.sum(-1, keepdim=True), base / base.sum(-1, keepdim=True),
                                   rtol=1e-4, atol=1e-6)


def test_reweight_and_blend_run_on_joint_attention(pipe):
    r = sdlens.edit.reweight(pipe, "a red circle", {"red": 0.0}, seed=0, trace={"dtype": torch.float32}, **KW)
    slots = r.trace.tokenization(1).word_tokens[r.trace.word_index("red", 1)]
    for layer in r.trace.layers_of("cross"):
        assert r.trace.maps(layer)[:, 1][..., slots].abs().max() == 0  # the word's attention is gone
    b = sdlens.edit.replace(pipe, "a red circle", "a blue circle", seed=0, blend="circle", **KW)
    assert b.masks is not None and b.masks.shape[0] == 1


def test_edits_a_flow_model_cannot_take_are_refused(pipe):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(EditError, match="inversion"):
        sdlens.edit.replace(pipe, "a red circle", "a blue circle", image=image, **KW)
    with pytest.raises(EditError, match="self_window"):
        sdlens.edit.replace(pipe, "a red circle", "a blue circle", self_window=0.5, **KW)
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())


# ------------------------------------------------------------------ the shipped model, through the tools


@pytest.fixture(scope="module")
def tiny3():
    return sdlens.load_pipeline("tiny-sd3")


def test_shipped_tiny_sd3_is_sd3s_classes_and_traces_unchanged(tiny3):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert type(tiny3).__name__ == "StableDiffusion3Pipeline"
    assert isinstance(tiny3.transformer, SD3Transformer2DModel)
    assert isinstance(tiny3.scheduler, FlowMatchEulerDiscreteScheduler)
    assert tiny3.text_encoder_3 is None and tiny3.tokenizer.model_max_length == 32
    kw = dict(num_inference_steps=4, output_type="np")
    plain = tiny3("a red circle on the left", generator=torch.Generator().manual_seed(1), **kw).images
    with sdlens.trace(tiny3, self_attn=True, text_attn=True, concepts=["red", "circle", "background"]) as tr:
        traced = tiny3("a red circle on the left", generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(traced, plain, rtol=0, atol=1e-4)  # the bound (here: bit for bit)
    assert len(tr.layers_of("cross")) == 8 and tr.map_size(tr.layers_of("cross")[0]) == (8, 8)
    assert tr.words() == "a red circle on the left".split()


def test_attend_on_tiny_sd3_with_concepts(tmp_path, capsys):
    from sdlens.cli import main

    out = tmp_path / "attend"
    rc = main(["attend", "a red circle on the left", "--model", "tiny-sd3", "--num-inference-steps", "3", "--no-progress",
               "--out", str(out), "--concepts", "red,circle", "background"])
    assert rc == 0
    assert {"image.png", "words.png", "concepts.png", "concepts-attention.png", "trace.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert sdlens.load_trace(out / "trace.safetensors").concepts == ["red", "circle", "background"]
    # on the UNet model concepts are refused, in one line, with nothing written
    bad = tmp_path / "bad"
    rc = main(["attend", "a red circle", "--model", "tiny", "--num-inference-steps", "2", "--out", str(bad), "--concepts", "red"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "joint attention" in err[-1] and not bad.exists()


def test_attend_text_attn_draws_word_maps_both_ways(tmp_path, capsys):
    from sdlens.cli import main

    out = tmp_path / "attend"
    rc = main(["attend", "a red circle on the left", "--model", "tiny-sd3", "--num-inference-steps", "3", "--no-progress",
               "--out", str(out), "--words", "red", "circle", "--text-attn"])
    assert rc == 0
    assert {"image.png", "words.png", "directions.png"} <= {p.name for p in out.iterdir()}
    saved = sdlens.load_trace(out / "trace.safetensors")
    assert "text_image" in saved.kinds
    torch.testing.assert_close(saved.word_map("circle", direction="text_image"), saved.text_map("circle"))
    bad = tmp_path / "bad"
    rc = main(["attend", "a red circle", "--model", "tiny", "--num-inference-steps", "2", "--out", str(bad), "--text-attn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--text-attn needs a model with joint attention" in err[-1] and not bad.exists()


def test_direction_grid_draws_a_row_per_word(tiny3):
    import matplotlib

    matplotlib.use("Agg")
    from sdlens import viz

    with sdlens.trace(tiny3, text_attn=True) as tr:
        image = tiny3("a red circle and a blue square", num_inference_steps=2,
                      generator=torch.Generator().manual_seed(0)).images[0]
    fig = viz.direction_grid(tr, image, words=["circle", "square"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[1:4] == ["circle: pixels → word", "circle: word → pixels", "circle: both agree"]
    assert len([t for t in titles if t.startswith("square:")]) == 3
    with sdlens.trace(tiny3) as plain:
        tiny3("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CaptureError, match="text_attn=True"):
        viz.direction_grid(plain, words=["circle"])


def test_sweep_on_tiny_sd3_counts_the_empty_t5_slots(tmp_path):
    from sdlens.cli import main
    from sdlens.sweep import load

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square\n")
    assert main(["sweep", str(prompts), "--model", "tiny-sd3", "--num-inference-steps", "3", "--out", str(tmp_path / "sw"),
                 "--no-progress"]) == 0
    records = load(tmp_path / "sw")
    records = records if isinstance(records, list) else records.to_dict("records")
    assert len(records) == 2
    for r in records:
        mass = r["mass"]["all"]
        assert set(mass) == {"start", "word", "end", "pad", "t5"}
        total = np.sum([np.asarray(v) for v in mass.values()], axis=0)
        np.testing.assert_allclose(total, 1.0, atol=1e-3)  # shares of the text part of the attention


def test_attention_explorer_on_a_tiny_sd3_trace(tiny3):
    import sdlens.viz as viz
    from sdlens.widgets import AttentionExplorer

    with sdlens.trace(tiny3) as tr:
        image = tiny3("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    ex = AttentionExplorer(tr, image, word="circle")
    fig = viz.overlay(tr, "circle", image)
    expected = np.asarray([ax for ax in fig.axes if ax.images][0].images[0].get_array())
    assert np.array_equal(ex.render(), expected)
    assert "direction" not in ex.controls  # no text queries traced: only the pixels' maps exist


def test_attention_explorer_reads_joint_attention_both_ways(tiny3):
    import sdlens.viz as viz
    from sdlens.widgets import AttentionExplorer

    with sdlens.trace(tiny3, text_attn=True) as tr:
        image = tiny3("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    ex = AttentionExplorer(tr, image, word="circle")
    for direction in ("text_image", "both"):
        ex.controls["direction"].value = direction
        fig = viz.overlay(tr, "circle", image, direction=direction)
        expected = np.asarray([ax for ax in fig.axes if ax.images][0].images[0].get_array())
        assert np.array_equal(ex.render(), expected) and np.array_equal(ex.displayed(), expected)
        assert "of the attention" not in ex.info.value
    ex.controls["word"].value = "<pad>"  # not a word: back to the pixels' maps, drawn without error
    assert ex.controls["direction"].value == "image_text" and "of the attention" in ex.info.value
    ex.controls["direction"].value = "both"  # and a direction picks a word again
    assert isinstance(ex.controls["word"].value, int)
    with pytest.raises(CaptureError, match="not a word"):
        viz.overlay(tr, "<pad>", image, direction="both")


def test_joint_parts_count_in_the_budget_before_the_first_step(pipe):
    from sdlens.errors import BudgetError

    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(BudgetError, match="max_bytes"):
            with sdlens.trace(pipe, text_attn=True, max_bytes=10_000):
                generate(pipe)
    finally:
        handle.remove()
    assert len(calls) == 1  # refused at the first call, before any attention was computed
    # text_attn adds (tokens × pixels + tokens²) per layer to the estimate: 333 text keys, 256 pixels
    with sdlens.trace(pipe, steps=[0], dtype=torch.float32) as plain:
        generate(pipe)
    with sdlens.trace(pipe, text_attn=True, steps=[0], dtype=torch.float32) as both:
        generate(pipe)
    assert both.nbytes - plain.nbytes == 2 * 4 * (333 * 256 + 333 * 333)  # 2 blocks, float32


def test_edit_command_on_tiny_sd3(tmp_path, capsys):
    from sdlens.cli import main

    out = tmp_path / "edit"
    assert main(["edit", "a red circle", "a blue circle", "--model", "tiny-sd3", "--num-inference-steps", "3", "--blend", "circle",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "side.png").exists() and json.loads((out / "settings.json").read_text())["blend"] is not None
    bad = tmp_path / "bad"
    rc = main(["edit", "a red circle", "a blue circle", "--model", "tiny-sd3", "--method", "inject_self",
               "--num-inference-steps", "3", "--out", str(bad)])
    assert rc == 2 and "self_window" in capsys.readouterr().err and not bad.exists()


def test_self_attention_denoising_and_edit_explorers_on_tiny_sd3(tiny3):
    import sdlens.viz as viz
    from sdlens.widgets import DenoisingExplorer, EditExplorer, SelfAttentionExplorer

    with sdlens.trace(tiny3, self_attn=True, record_latents=True) as tr:
        image = tiny3("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    ex = SelfAttentionExplorer(tr, image)
    fig = viz.self_attention_map(tr, (32, 32), image)
    assert np.array_equal(ex.render(), np.asarray([ax for ax in fig.axes if ax.images][0].images[0].get_array()))
    den = DenoisingExplorer(tr)
    den.controls["step"].value = 2
    x0 = tr.x0_images[2, 0]
    assert x0.shape == (64, 64, 3) and np.array_equal(den.render()[:, -64:], x0)
    # the last step's predicted clean picture is the image the pipeline returned (flow matching's x0)
    assert np.abs(x0.astype(int) - np.asarray(image).astype(int)).mean() < 8
    edit_ex = EditExplorer(tiny3, "a red circle", "a blue circle", seed=3, num_inference_steps=3)
    assert edit_ex.render().shape[-1] == 3
