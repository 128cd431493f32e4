"""Tracing Flux (double- and single-stream blocks, through diffusers' attention dispatcher) and SD 3.5
(qk-norm, MMDiT-X's second attention), on random-weight layouts built offline.

References are computed another way: the softmax of q·k recomputed by hand from each attention
module's own inputs (grabbed by a forward pre-hook) and its projections, norms and rotary
positions; the untraced image; a T5-style tokenizer built here (no start token, SentencePiece word
marks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _weights import give_weights
from diffusers.models.embeddings import apply_rotary_emb

import sdlens
import sdlens.hooks.dispatch as dispatch
from sdlens.capture.controller import Capture
from sdlens.capture.spec import CaptureSpec
from sdlens.errors import BudgetError, CaptureError
from sdlens.hooks import Controller, attach
from sdlens.models.families import flux, sd35

KW = dict(num_inference_steps=3, output_type="np", height=32, width=32, max_sequence_length=16)


def _randomise(pipe):
    give_weights(pipe.transformer, 0.1)
    return pipe


@pytest.fixture(scope="module")
def fpipe():
    return _randomise(flux())


@pytest.fixture(scope="module")
def spipe():
    return _randomise(sd35())


def generate(pipe, prompt="a red circle left of a blue square", seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


def _dispatchers():
    import diffusers.models.transformers.transformer_flux as tf

    return tf.dispatch_attention_fn


# ---------------------------------------------------------------- the model and the dispatcher stay untouched
@pytest.mark.parametrize("which", ["flux", "sd35"])
def test_traced_image_equals_untraced_and_everything_is_put_back(which, fpipe, spipe):
    pipe = fpipe if which == "flux" else spipe
    before = dict(pipe.transformer.attn_processors)
    fn = _dispatchers()
    plain = generate(pipe)
    with sdlens.trace(pipe, self_attn=True, text_attn=True, concepts=["circle", "square", "background"],
                      dtype=torch.float32) as tr:
        traced = generate(pipe)
    np.testing.assert_array_equal(traced, plain)  # concept tokens and all: bit for bit
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert _dispatchers() is fn and not hasattr(fn, "__wrapped__")
    assert set(tr.kinds) == {"cross", "self", "text_image", "text_text", "concept", "concept_image"}
    assert tr.num_steps == 3 and len(tr.steps) == 3
    if which == "flux":
        assert tr.layers_of("cross") == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                         "single_transformer_blocks.1.attn"]
        assert all(tr.map_size(layer) == (8, 8) for layer in tr.layers_of("cross"))  # 32 px / 8 / 2×2 packing
        assert [r.half for r in tr.rows] == ["cond"]  # guidance distilled: one row, no CFG halves
    else:
        assert "transformer_blocks.0.attn2" in tr.layers_of("self")  # MMDiT-X's image-only attention
        assert "transformer_blocks.0.attn2" not in tr.layers_of("cross")


def _grab_inputs(pipe):
    """Forward pre-hooks that keep each attention module's last inputs: ``(inputs, handles)``."""
    inputs = {}

    def grab(name):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            inputs[name] = (hidden, kwargs.get("encoder_hidden_states"), kwargs.get("image_rotary_emb"))
        return hook

    modules = {n: m for n, m in pipe.transformer.named_modules() if n.endswith((".attn", ".attn2"))}
    return inputs, modules, [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in modules.items()]


def explicit_flux_probs(attn, hidden, context, rope):
    """Flux's attention by hand: ``(heads, n, n)`` over the layer's own order (text, then image)."""
    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))  # (b, n, heads, d)

    q, k = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
    if context is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(context))), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(context))), k], dim=1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return scores.softmax(-1)[0]


def test_flux_maps_of_both_block_kinds_are_the_explicit_softmax(fpipe):
    inputs, modules, handles = _grab_inputs(fpipe)
    try:
        with sdlens.trace(fpipe, self_attn=True, text_attn=True, heads="all", dtype=torch.float32, steps=[-1]) as tr:
            generate(fpipe)
    finally:
        for h in handles:
            h.remove()
    t = 16  # max_sequence_length: the text keys, first in Flux's sequence
    for name, attn in modules.items():
        hidden, context, rope = inputs[name]
        with torch.no_grad():
            ref = explicit_flux_probs(attn, hidden, context, rope)  # (heads, t + 64, t + 64), text first
        ref = torch.cat([ref[:, t:], ref[:, :t]], 1)  # queries: image, then text
        ref = torch.cat([ref[:, :, t:], ref[:, :, :t]], 2)  # keys too
        got = torch.cat([torch.cat([tr.maps(name, "self")[0, 0].flatten(1, 2), tr.maps(name, "cross")[0, 0].flatten(1, 2)], -1),
                         torch.cat([tr.maps(name, "text_image")[0, 0].flatten(-2), tr.maps(name, "text_text")[0, 0]], -1)], 1)
        assert got.shape == ref.shape == (2, 64 + t, 64 + t), name
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-4)
    assert any(".single_transformer_blocks." in f".{n}" for n in modules)


def test_sd35_qk_norm_and_second_attention_are_the_explicit_softmax(spipe):
    inputs, modules, handles = _grab_inputs(spipe)
    try:
        with sdlens.trace(spipe, self_attn=True, heads="all", dtype=torch.float32, steps=[-1]) as tr:
            generate(spipe)
    finally:
        for h in handles:
            h.remove()
    for name, attn in modules.items():
        hidden, context, _ = inputs[name]
        row = hidden.shape[0] - 1  # the conditional half of the CFG batch

        def heads(x, norm, attn=attn):
            x = x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            return norm(x) if norm is not None else x

        with torch.no_grad():
            q, k = heads(attn.to_q(hidden[row:]), attn.norm_q), heads(attn.to_k(hidden[row:]), attn.norm_k)
            if context is not None:
                q = torch.cat([q, heads(attn.add_q_proj(context[row:]), attn.norm_added_q)], 2)
                k = torch.cat([k, heads(attn.add_k_proj(context[row:]), attn.norm_added_k)], 2)
            ref = (torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5).softmax(-1)[0]
        n = 64
        if context is None:  # attn2: image tokens only
            got = tr.maps(name, "self")[0, 0].flatten(1, 2)
            torch.testing.assert_close(got.double(), ref[:, :n, :n], rtol=1e-4, atol=1e-6)
        else:
            got = torch.cat([tr.maps(name, "self")[0, 0].flatten(1, 2), tr.maps(name, "cross")[0, 0].flatten(1, 2)], -1)
            torch.testing.assert_close(got.double(), ref[:, :n], rtol=1e-4, atol=1e-6)
    assert tr.key_labels and tr.key_labels[0].startswith("t5:")  # SD 3.5's T5 slots follow the 77 CLIP slots


# ---------------------------------------------------------------- words, budget, restore, refusals
def test_flux_words_are_the_t5_prompt_2s(fpipe):
    with sdlens.trace(fpipe) as tr:
        generate(fpipe, prompt="a photo", prompt_2="a green triangle above")
    assert tr.words() == ["a", "green", "triangle", "above"] == tr.words(encoder=2)
    assert len(tr.tokens()) == 16  # the T5 slots are all the text keys
    assert tr.word_map("triangle").shape == (32, 32)
    with pytest.raises(CaptureError, match="photo"):
        tr.word_map("photo")  # CLIP's prompt reaches only the pooled vector


def test_a_t5_tokenizer_without_a_start_token_names_the_slots(fpipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ["a", "red", "circle", "left", "of", "blue", "square"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -2.0) for w in words] + \
        [("\u2581", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    original = fpipe.tokenizer_2
    fpipe.tokenizer_2 = t5
    try:
        with sdlens.trace(fpipe, concepts=["circle", "square"]) as tr:
            generate(fpipe, prompt="a red circle, left of a bluish square")
    finally:
        fpipe.tokenizer_2 = original
    toks = tr.tokenization()
    assert toks.tokens[:4] == ["a", "red", "circle", ","] and "<start>" not in toks.tokens
    assert toks.words == ["a", "red", "circle,", "left", "of", "a", "bluish", "square"]
    assert toks.word_tokens[2] == [2, 3] and toks.kinds[toks.word_tokens[-1][-1] + 1] == "end"
    assert tr.word_map("bluish").shape == (32, 32) and tr.concept_map("square").shape == (32, 32)


def test_flux_budget_refuses_before_the_first_step(fpipe):
    calls = []
    handle = fpipe.transformer.x_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(BudgetError, match="bytes"):
            with sdlens.trace(fpipe, self_attn=True, text_attn=True, heads="all", max_bytes=10_000):
                generate(fpipe)
    finally:
        handle.remove()
    assert calls == []  # refused in the first call's pre-hook, before the transformer's first layer
    r = sdlens.trace(fpipe, self_attn=True, text_attn=True, heads="all", max_bytes=10**7)
    with r as tr:
        generate(fpipe)
    assert r.estimate.total == tr.nbytes  # every part of the joint and single-stream layers counted


class _Boom(Controller):
    def layers(self, run):
        return [info.name for info in run.layers]

    def qkv(self, call, q, k, v):
        if call.step == 1 and call.layer.single_stream:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_flux_restores_processors_and_dispatcher_after_an_error(fpipe, error):
    before = dict(fpipe.transformer.attn_processors)
    fn = _dispatchers()
    boom = _Boom()
    boom.error = error
    with pytest.raises(type(error)):
        with attach(fpipe, [boom]):
            generate(fpipe)
    after = fpipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before) and _dispatchers() is fn
    assert dispatch._patched == {}


def test_true_cfg_is_refused_with_the_way_out(fpipe):
    with pytest.raises(CaptureError, match="true_cfg_scale=1"):
        with sdlens.trace(fpipe):
            generate(fpipe, negative_prompt="blurry", true_cfg_scale=2.0)
    assert _dispatchers() is not None and dispatch._patched == {}


# ---------------------------------------------------------------- editing through the dispatcher
class _Scale(Controller):
    """Multiplies the image queries' probabilities of some text keys by ``factor`` (no renormalising)."""

    edits = True

    def __init__(self, layer, slots, factor):
        self.layer, self.slots, self.factor = layer, slots, factor

    def layers(self, run):
        return [self.layer]

    def probs(self, call, p):
        p = p.clone()
        n = call.n_img_keys
        cols = [n + s for s in self.slots]
        p[:, :, : call.n_img_queries, cols] *= self.factor
        return p


def test_a_probability_editor_changes_the_image_and_capture_sees_its_column(fpipe):
    prompt = "a red circle left of a blue square"
    with sdlens.trace(fpipe, dtype=torch.float32) as plain_tr:
        plain = generate(fpipe, prompt)
    slots = plain_tr.tokenization().word_tokens[plain_tr.word_index("circle")]
    capture = Capture(CaptureSpec(dtype=torch.float32))
    edited_layer = "single_transformer_blocks.1.attn"  # the last block: at step 0 its inputs are the plain run's
    with attach(fpipe, [_Scale(edited_layer, slots, 3.0), capture]):  # the editor first, then capture observes
        edited = generate(fpipe, prompt)
    tr = capture.trace
    assert np.abs(edited - plain).max() > 1e-4  # the edit reached the picture (tracing alone changes no bit)
    for layer in tr.layers_of("cross"):
        before, after = plain_tr.maps(layer, "cross")[0], tr.maps(layer, "cross")[0]  # step 0
        if layer != edited_layer:  # before it in the step: untouched
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-8)
            continue
        torch.testing.assert_close(after[..., slots], 3.0 * before[..., slots], rtol=1e-4, atol=1e-7)
        others = [s for s in range(before.shape[-1]) if s not in slots]
        torch.testing.assert_close(after[..., others], before[..., others], rtol=1e-4, atol=1e-7)
    later = tr.maps(edited_layer, "cross")[1:] - plain_tr.maps(edited_layer, "cross")[1:]
    assert later.abs().max() > 1e-4  # later steps start from an edited latent


def test_uncaptured_layers_keep_their_processor_and_the_backend_is_used(fpipe):
    name = "single_transformer_blocks.1.attn"
    seen = []
    with sdlens.trace(fpipe, layers=[name]) as tr:
        procs = fpipe.transformer.attn_processors
        handle = fpipe.transformer.register_forward_hook(lambda *a: seen.append(
            {k.removesuffix(".processor"): type(p).__name__ for k, p in fpipe.transformer.attn_processors.items()}))
        generate(fpipe)
        handle.remove()
    assert tr.layers_of("cross") == [name]
    assert seen[0] == {"transformer_blocks.0.attn": "FluxAttnProcessor", "single_transformer_blocks.0.attn": "FluxAttnProcessor",
                       name: "HookProcessor"}
    assert procs is not None
    # a backend the processor is set to is the one the hooked layer's dispatcher call uses
    fpipe.transformer.set_attention_backend("_native_math")
    try:
        plain = generate(fpipe)
        with sdlens.trace(fpipe, layers=[name]):
            traced = generate(fpipe)
    finally:
        fpipe.transformer.reset_attention_backend()
    np.testing.assert_array_equal(traced, plain)


def test_concept_maps_on_flux_and_sd35(fpipe, spipe):
    for pipe, n_joint in ((fpipe, 3), (spipe, 2)):
        with sdlens.trace(pipe, concepts=["circle", "square", "background"], cross=False) as tr:
            generate(pipe)
        total = sum(tr.concept_map(c) for c in ("circle", "square", "background"))
        torch.testing.assert_close(total, torch.ones(32, 32), rtol=0, atol=1e-4)  # a softmax over the concepts
        assert len(tr.layers_of("concept")) == n_joint  # every joint and single-stream block
        assert len(tr.layers_of("concept_image")) == n_joint
        for name in tr.layers_of("concept_image"):  # each concept's attention: a share of it on the image
            on_image = tr.maps(name, "concept_image")[:, 0, 0].float().sum(dim=(1, 2))  # (steps, C)
            assert bool((on_image > 0).all()) and bool((on_image < 1 + 1e-3).all())
        assert tr.concept_map("circle", space="attention").shape == (32, 32)


def test_sdlens_edit_refuses_flux_plainly(fpipe):
    from sdlens import edit
    from sdlens.errors import EditError

    with pytest.raises(EditError, match="Flux is traced .* but not edited"):
        edit.replace(fpipe, "a red circle", "a blue circle", **KW)


def test_figures_of_a_flux_trace(fpipe):
    import matplotlib

    matplotlib.use("Agg")
    from sdlens import viz

    with sdlens.trace(fpipe, concepts=["circle", "background"]) as tr:
        image = generate(fpipe, prompt="a red circle")[0]
    fig = viz.word_grid(tr, image)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("circle" in t for t in titles) and any("red" in t for t in titles)
    fig = viz.concept_grid(tr, image)
    assert any("background" in ax.get_title() for ax in fig.axes)
