"""sdlens.trace on tiny random-weight pipelines of every family: fidelity, bookkeeping, restoration."""

from __future__ import annotations

import pytest
import torch
from _reference import reference_cross_maps
from _runs import PROMPT, gen, run
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import sdlens
from sdlens.capture import BudgetError, CaptureError
from sdlens.hooks import attention_layers
from sdlens.hooks.layers import denoiser_of
from sdlens.models.families import FAMILIES, sd1, sd15_layout, sd15_layout_unet

JOINT = ("sd3", "sd35", "flux")  # families whose attention is joint (image and text keys in one softmax)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


# ---------------------------------------------------------------- the model stays untouched
def test_traced_image_equals_untraced(family):
    name, pipe = family
    before = dict(denoiser_of(pipe).attn_processors)
    plain = run(pipe)
    with sdlens.trace(pipe, self_attn=True, dtype=torch.float32) as tr:
        traced = run(pipe)
    assert abs(plain - traced).max() <= 1e-4
    after = denoiser_of(pipe).attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(tr.steps) == 3 and tr.num_steps == 3
    # every captured layer has one map per step, per kind
    for kind in ("cross", "self"):
        for layer in tr.layers_of(kind):
            m = tr.maps(layer, kind)
            h, w = tr.map_size(layer)
            assert m.shape[:5] == (3, 1, 1, h, w)


def test_rows_sum_to_one(family):
    name, pipe = family
    with sdlens.trace(pipe, self_attn=True, heads="all", dtype=torch.float32) as tr:
        run(pipe)
    assert tr.layers_of("cross")
    for layer in tr.layers_of("cross"):
        cross = tr.maps(layer, "cross").sum(-1)
        selfs = tr.maps(layer, "self").sum(-1) if layer in tr.layers_of("self") else None
        if name in JOINT:  # joint attention: one softmax over image and text keys
            torch.testing.assert_close(cross + selfs, torch.ones_like(cross), atol=1e-5, rtol=0)
            assert (cross < 1).all()
        else:
            torch.testing.assert_close(cross, torch.ones_like(cross), atol=1e-5, rtol=0)
    for layer in tr.layers_of("self"):
        if name in JOINT and layer in tr.layers_of("cross"):  # a joint layer: checked with its text keys above
            continue
        s = tr.maps(layer, "self").sum(-1)  # self-attention alone (SD 3.5's attn2 too)
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def test_maps_match_diffusers_explicit_attention(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, heads="all", cfg="both", dtype=torch.float32) as tr:
        run(pipe, steps=2)
    ref = reference_cross_maps(pipe, lambda: run(pipe, steps=2))
    assert ref
    for layer, expected in ref.items():  # (steps, batch·heads, n, 77)
        ours = tr.maps(layer, "cross")  # (steps, rows, heads, h, w, 77); rows = uncond, cond
        ours = ours.flatten(3, 4).flatten(1, 2)
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_fused_and_delegating_paths_agree(sd1_pipe):
    """Default SDPA layers run fused (output op for op, probabilities from its own q/k); a custom
    processor is delegated to and q/k recomputed: the same maps either way."""
    pipe = sd1_pipe
    seen: dict[str, bool] = {}

    def traced_maps():
        with sdlens.trace(pipe, self_attn=True, heads="all", cfg="both", dtype=torch.float32) as tr:
            run(pipe, steps=2)
            for name, proc in pipe.unet.attn_processors.items():  # installed at the first step
                if type(proc).__name__ == "HookProcessor":
                    seen[name] = proc.fused
        return {(kind, layer): tr.maps(layer, kind) for kind in ("cross", "self") for layer in tr.layers_of(kind)}

    fused = traced_maps()
    assert seen and all(seen.values())
    original = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(AttnProcessor())  # explicit softmax: not AttnProcessor2_0, so delegated
    try:
        seen.clear()
        delegated = traced_maps()
        assert seen and not any(seen.values())
    finally:
        pipe.unet.set_attn_processor(dict(original))
    assert fused.keys() == delegated.keys() and len(fused) > 0
    for key in fused:
        torch.testing.assert_close(fused[key], delegated[key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("boolean", [False, True])
def test_sdpa_forward_is_diffusers_sdpa_processor_with_a_mask(boolean):
    from diffusers.models.attention_processor import Attention

    from sdlens.hooks.attention import attention_probs, sdpa_forward

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 16)
    keep = torch.ones(2, 1, 7, dtype=torch.bool)
    keep[0, :, 5:] = False  # the first row may not look at its last two keys
    mask = keep if boolean else (~keep).float() * -10000.0  # the UNet passes an additive (b, 1, keys) bias
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, x, ctx, mask)
        out, q, k, bias = sdpa_forward(attn, x, ctx, mask, None)
        probs = attention_probs(q, k, q.shape[-1] ** -0.5, bias)  # (2, 4, 10, 7)
        # reference: diffusers' explicit softmax on an additive mask
        additive = (~keep).float() * -10000.0
        ref = attn.get_attention_scores(
            attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(ctx)),
            attn.prepare_attention_mask(additive, 7, 2),
        ).view(2, 4, 10, 7)
    assert torch.equal(out, expected)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    assert probs[0, :, :, 5:].max() < 1e-6 and probs[1, :, :, 5:].min() > 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))



@pytest.mark.parametrize("mask_rows", [1, 10])
def test_chunked_probabilities_and_per_chunk_head_reduction(monkeypatch, mask_rows):
    from sdlens.hooks import attention as probs

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 7, 8)
    bias = torch.randn(2, 1, mask_rows, 7)
    bias[0, ..., 5:] = float("-inf")
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.3 + bias.double(), dim=-1)
    pick = torch.tensor([3, 1])
    for elements in (10**6, 4 * 7 * 3):  # one chunk; then 3 queries per chunk (the last one shorter)
        monkeypatch.setattr(probs, "CHUNK_ELEMENTS", elements)
        full = probs.attention_probs(q, k, 0.3, bias)
        mean = probs.attention_probs(q, k, 0.3, bias, reduce=lambda p: p.mean(dim=1, keepdim=True))
        some = probs.attention_probs(q, k, 0.3, bias, reduce=lambda p: p.index_select(1, pick))
        torch.testing.assert_close(full, ref.float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mean, ref.mean(dim=1, keepdim=True).float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(some, ref[:, [3, 1]].float(), atol=1e-6, rtol=1e-5)
        assert full.shape == (2, 4, 10, 7) and mean.shape == (2, 1, 10, 7) and some.shape == (2, 2, 10, 7)



def test_batched_layers_give_each_layer_its_own_probabilities(monkeypatch):
    """compute_pending stacks same-shape layers of a step: each must get exactly what it alone would."""
    from sdlens.capture import probs

    class Sink:  # stands in for the capture's store of one layer: collects what it is given
        def __init__(self):
            self.got = []

        def store(self, p, n_img_keys):
            self.got.append((p.clone(), n_img_keys))

    torch.manual_seed(0)
    mean = lambda p: p.mean(dim=1, keepdim=True)  # noqa: E731
    items, sinks = [], []
    for i in range(7):  # 4 of one shape (CFG batch of 2, keep row 1), 2 of another, one with a mask
        n, keys = (16, 5) if i < 4 else (9, 3)
        q, k = torch.randn(2, 4, n, 8), torch.randn(2, 4, keys, 8)
        bias = torch.randn(2, 1, 1, keys) if i == 6 else None
        sinks.append(Sink())
        items.append(probs.Pending(sinks[-1].store, q, k, 0.35, bias, 0, slice(1, 2)))
    calls = []
    real = probs.attention_probs
    monkeypatch.setattr(probs, "attention_probs", lambda q, *a, **kw: calls.append(q.shape[0]) or real(q, *a, **kw))
    # everything batched: [4 layers], [2], [the masked one]; then at most 2 layers a batch
    for group_elements, batches in ((1 << 20, [4, 2, 1]), (4 * 16 * 5 * 2, [2, 2, 2, 1])):
        monkeypatch.setitem(probs.GROUP_ELEMENTS, False, group_elements)
        for sink in sinks:
            sink.got.clear()
        calls.clear()
        probs.compute_pending(items, mean, heads_kept=1)
        assert calls == batches  # one row kept per layer
        for it, sink in zip(items, sinks):
            bias = None if it.bias is None else it.bias[1:2]
            expected = real(it.q[1:2], it.k[1:2], 0.35, bias).mean(dim=1, keepdim=True)
            (got, n_img), = sink.got
            assert n_img == 0
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)



def test_held_back_queries_are_bounded(monkeypatch, sd1_pipe):
    from sdlens.capture import probs

    pipe = sd1_pipe
    kw = dict(self_attn=True, heads="all", dtype=torch.float32)
    with sdlens.trace(pipe, **kw) as whole_steps:
        run(pipe, steps=2)
    flushes = []
    real = probs.compute_pending
    monkeypatch.setattr("sdlens.capture.controller.compute_pending", lambda p, *a: flushes.append(len(p)) or real(p, *a))
    monkeypatch.setattr(probs, "PENDING_BYTES", 1)  # every call is computed as soon as it is handed over
    with sdlens.trace(pipe, **kw) as each_call:
        run(pipe, steps=2)
    assert set(flushes) == {1} and len(flushes) == 2 * len(each_call.keys())
    assert each_call.layers == whole_steps.layers and each_call.keys() == whole_steps.keys()
    for kind, layer in whole_steps.keys():
        torch.testing.assert_close(each_call.maps(layer, kind), whole_steps.maps(layer, kind), atol=1e-6, rtol=1e-5)


def test_storage_without_a_step_count_grows_and_matches_a_preallocated_one(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, self_attn=True) as tr:  # the pipeline says 10 steps: storage made once
        run(pipe, steps=10)
    # a bare denoiser does not say how many steps will come: storage starts at 8 steps and grows
    r = sdlens.trace(pipe.unet, self_attn=True, prompt=PROMPT)
    with r as bare:
        run(pipe, steps=10)
    assert r.estimate is None and bare.steps == tr.steps == list(range(10))
    assert bare.keys() == tr.keys() and tr.keys()
    for kind, layer in tr.keys():
        torch.testing.assert_close(bare.maps(layer, kind=kind), tr.maps(layer, kind=kind), atol=0, rtol=0)
    expected = sum(tr.maps(layer, kind).numel() * tr.maps(layer, kind).element_size() for kind, layer in tr.keys())
    assert tr.nbytes == bare.nbytes == expected


def test_interrupted_run_keeps_the_steps_it_made(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe) as full:
        pipe(PROMPT, num_inference_steps=5, generator=gen(), output_type="latent")

    def stop_after_step_1(p, i, t, kw):
        if i == 1:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe) as part:
            pipe(PROMPT, num_inference_steps=5, generator=gen(), output_type="latent",
                 callback_on_step_end=stop_after_step_1)
    assert part.steps == [0, 1] and part.layers == full.layers
    for layer in full.layers:
        m = part.maps(layer)
        assert m.shape[0] == 2 and m.shape[1:] == full.maps(layer).shape[1:]
        torch.testing.assert_close(m, full.maps(layer)[:2], atol=0, rtol=0)
    assert part.nbytes * 5 == full.nbytes * 2


def test_a_layer_whose_map_changes_shape_mid_run_is_an_error():
    from sdlens.result.recording import StepStorage

    f = StepStorage(torch.zeros(1, 1, 16, 77), capacity=2, device="cpu", dtype=torch.float16)
    f.write(0, torch.ones(1, 1, 16, 77))
    with pytest.raises(CaptureError, match=r"\(1, 1, 64, 77\).*earlier steps.*\(1, 1, 16, 77\)"):
        f.write(1, torch.ones(1, 1, 64, 77))
    assert f.count == 1 and f.result().shape == (1, 1, 1, 16, 77) and f.result().dtype == torch.float16


def test_storage_slots_a_layer_skipped_are_nan_and_a_second_call_in_one_step_is_an_error():
    from sdlens.result.recording import StepStorage

    f = StepStorage(torch.zeros(1, 1, 4, 3), capacity=4, device="cpu", dtype=torch.float32)
    f.write(0, torch.full((1, 1, 4, 3), 0.5), "up.attn2")
    f.write(2, torch.full((1, 1, 4, 3), 0.25), "up.attn2")  # the layer did not run at step 1
    with pytest.raises(CaptureError, match=r"'up.attn2' was called twice in one denoiser call"):
        f.write(2, torch.ones(1, 1, 4, 3), "up.attn2")
    out = f.result()
    assert out.shape[0] == 3 and torch.isnan(out[1]).all()
    assert (out[0] == 0.5).all() and (out[2] == 0.25).all()  # and the refused write changed nothing


def test_interrupt_while_held_back_maps_are_computed_still_restores(monkeypatch, sd1_pipe):
    pipe = sd1_pipe
    before = dict(pipe.unet.attn_processors)

    def fail_in_forward(module, args, output):
        raise RuntimeError("the denoiser failed after its attention layers ran")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    # the denoiser fails mid-call; the trace drops that step and finishes its recording, and a Ctrl-C
    # while it does so still leaves nothing of the trace on the model
    monkeypatch.setattr("sdlens.result.recording.Recording.finish", interrupted)
    h = pipe.unet.conv_out.register_forward_hook(fail_in_forward)  # queries and keys are held back then
    try:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the trace cleans up after the failure
            with sdlens.trace(pipe):
                run(pipe, steps=1)
    finally:
        h.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks and "encode_prompt" not in vars(pipe)


# ---------------------------------------------------------------- SD 1.5's layout
def test_sd15_layout_has_16_cross_layers_at_four_sizes():
    unet = sd15_layout_unet(width=32, sample_size=64)
    cross = [i for i in attention_layers(unet) if i.role == "cross"]
    assert len(cross) == 16
    sizes = {i.name: i.map_size((64, 64))[0] for i in cross}
    assert {n: s for n, s in sizes.items() if n.startswith("down_blocks")} == {
        f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": 64 // 2**b for b in range(3) for a in range(2)
    }
    assert sizes["mid_block.attentions.0.transformer_blocks.0.attn2"] == 8
    assert {n: s for n, s in sizes.items() if n.startswith("up_blocks")} == {
        f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": 8 * 2**b for b in (1, 2, 3) for a in range(3)
    }
    assert all(i.heads == 8 for i in cross)


def test_sd15_layout_run_at_small_latent():
    pipe = sd15_layout(width=32, sample_size=16)
    with sdlens.trace(pipe) as tr:
        pipe(PROMPT, num_inference_steps=2, height=128, width=128, generator=gen(), output_type="latent")
    assert len(tr.layers_of("cross")) == 16
    assert sorted({tr.map_size(n)[0] for n in tr.layers}) == [2, 4, 8, 16]
    assert tr.map_size("down_blocks.0.attentions.1.transformer_blocks.0.attn2") == (16, 16)
    assert tr.map_size("up_blocks.3.attentions.2.transformer_blocks.0.attn2") == (16, 16)
    assert tr.layers[0].startswith("down_blocks.0") and tr.layers[-1].startswith("up_blocks.3")


# ---------------------------------------------------------------- batches, CFG halves, sizes
def _latents(pipe, n, h=64, w=64, seed=1):
    c = pipe.unet.config.in_channels
    return torch.randn(n, c, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, generator=gen(seed))


def test_batched_prompts_match_single_runs(sd1_pipe):
    pipe = sd1_pipe
    lat = _latents(pipe, 2)
    prompts = ["a red circle on the left", "a blue square at the top"]
    with sdlens.trace(pipe, dtype=torch.float32) as tr:
        pipe(prompts, num_inference_steps=2, latents=lat, output_type="latent")
    assert tr.prompts == prompts and [(r.prompt, r.half) for r in tr.rows] == [(0, "cond"), (1, "cond")]
    assert tr.words(1) == ["a", "blue", "square", "at", "the", "top"]
    for i, p in enumerate(prompts):
        with sdlens.trace(pipe, dtype=torch.float32) as single:
            pipe(p, num_inference_steps=2, latents=lat[i : i + 1], output_type="latent")
        for layer in tr.layers:
            torch.testing.assert_close(tr.maps(layer)[:, tr.row(i)], single.maps(layer)[:, 0], atol=1e-5, rtol=1e-4)


def test_negative_prompt_is_the_uncond_half(sd1_pipe):
    pipe = sd1_pipe
    lat = _latents(pipe, 1)
    with sdlens.trace(pipe, cfg="both", steps=[0], dtype=torch.float32) as tr:
        pipe("red", negative_prompt="blue", num_inference_steps=2, latents=lat, output_type="latent")
    assert tr.negative_prompts == ["blue"]
    assert tr.words(0, half="uncond") == ["blue"]
    with sdlens.trace(pipe, steps=[0], dtype=torch.float32) as ref:
        pipe("blue", negative_prompt="red", num_inference_steps=2, latents=lat, output_type="latent")
    layer = tr.layers[0]
    # at step 0 both halves see the same latent, so the uncond row of one run is the cond row of the other
    torch.testing.assert_close(tr.maps(layer)[0, tr.row(0, half="uncond")], ref.maps(layer)[0, 0], atol=1e-5, rtol=1e-4)


def test_no_cfg_batch_and_images_per_prompt_and_non_square(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe) as tr:
        pipe(["a red circle", "a blue square"], num_images_per_prompt=2, guidance_scale=1.0,
             num_inference_steps=2, height=64, width=96, generator=gen(), output_type="latent")
    assert [(r.prompt, r.image, r.half) for r in tr.rows] == [(0, 0, "cond"), (0, 1, "cond"), (1, 0, "cond"), (1, 1, "cond")]
    assert tr.image_size == (64, 96)
    assert tr.map_size(tr.layers[0]) == (32, 48)
    assert tr.word_map("square", prompt_index=1, image_index=1).shape == (64, 96)
    with pytest.raises(CaptureError, match="cfg='cond'"):
        with sdlens.trace(pipe, cfg="uncond"):
            pipe("x", guidance_scale=1.0, num_inference_steps=1, output_type="latent")


# ---------------------------------------------------------------- restoration
def test_restores_on_exception_and_keyboard_interrupt_and_custom_processors(sd1_pipe):
    pipe = sd1_pipe
    custom = AttnProcessor()  # a user's own processor must come back, and be used while tracing
    pipe.unet.set_attn_processor(custom)
    before = dict(pipe.unet.attn_processors)

    def boom(exc):
        def cb(p, i, t, kw):
            raise exc
        return cb

    for exc in (RuntimeError("user code failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with sdlens.trace(pipe):
                pipe(PROMPT, num_inference_steps=2, callback_on_step_end=boom(exc), output_type="latent")
        after = pipe.unet.attn_processors
        assert all(after[k] is before[k] for k in before)
        assert "encode_prompt" not in vars(pipe) and not pipe.unet._forward_pre_hooks
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_nested_trace_is_an_error(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe):
        with pytest.raises(CaptureError, match="already being traced"):
            with sdlens.trace(pipe):
                pass
    with sdlens.trace(pipe):  # and the first one cleaned up
        pass


def test_uncaptured_layers_keep_their_processor(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, layers="down_blocks.*"):
        procs = pipe.unet.attn_processors
        pipe(PROMPT, num_inference_steps=1, output_type="latent")
        procs = pipe.unet.attn_processors
    kinds = {k: type(v).__name__ for k, v in procs.items()}
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == "HookProcessor"
    assert kinds["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == "AttnProcessor2_0"
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] == "AttnProcessor2_0"


def test_one_call_per_trace(sd1_pipe):
    pipe = sd1_pipe
    with pytest.raises(CaptureError, match="one pipeline call"):
        with sdlens.trace(pipe):
            run(pipe, steps=1)
            run(pipe, steps=1)


# ---------------------------------------------------------------- spec: selection, budget
def test_selection_by_pattern_size_predicate_steps_heads(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, layers=16, steps=[0, -1], heads=[1]) as tr:
        run(pipe, steps=4)
    assert tr.steps == [0, 3] and len(tr.timesteps) == 2
    assert all(tr.map_size(n) == (16, 16) for n in tr.layers) and tr.layers
    assert tr.maps(tr.layers[0]).shape[2] == 1 and set(map(tuple, tr.head_indices.values())) == {(1,)}
    with sdlens.trace(pipe, layers=lambda n: n.startswith("up_blocks.1")) as tr2:
        run(pipe, steps=1)
    assert tr2.layers and all(n.startswith("up_blocks.1") for n in tr2.layers)
    with pytest.raises(CaptureError, match="layers are"):
        sdlens.trace(pipe, layers="nope.*").__enter__()
    with pytest.raises(CaptureError, match="sizes are"):
        with sdlens.trace(pipe, layers=5):
            run(pipe, steps=1)
    with pytest.raises(CaptureError, match="steps 0..1"):
        with sdlens.trace(pipe, steps=[7]):
            run(pipe, steps=2)
    with pytest.raises(CaptureError, match="'cond', 'uncond', 'both'"):
        sdlens.trace(pipe, cfg="positive")
    assert pipe.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"].__class__ is AttnProcessor2_0


def test_budget_raises_before_the_first_forward_and_estimate_is_accurate(sd1_pipe):
    pipe = sd1_pipe
    calls = []
    h = pipe.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(BudgetError, match=r"about .* bytes.*To reduce it"):
            with sdlens.trace(pipe, self_attn=True, max_bytes=10_000):
                run(pipe, steps=3)
        assert calls == []
    finally:
        h.remove()
    with sdlens.trace(pipe, self_attn=True, cfg="both", heads="all", max_bytes=10**9) as tr:
        run(pipe, steps=3)
    rec_estimate = tr.nbytes
    with sdlens.trace(pipe, self_attn=True, cfg="both", heads="all") as rec:
        pass
    del rec
    # the recorder's own estimate, computed before step 0
    r = sdlens.trace(pipe, self_attn=True, cfg="both", heads="all")
    with r as tr2:
        run(pipe, steps=3)
    assert r.estimate is not None
    assert abs(r.estimate.total - tr2.nbytes) <= 0.1 * tr2.nbytes
    assert rec_estimate == tr2.nbytes


def test_self_layers_pick_self_attention_apart_from_cross_attention(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, self_attn=True) as full:
        run(pipe, steps=2)
    small = min(full.map_size(n)[0] for n in full.layers_of("self"))
    r = sdlens.trace(pipe, self_attn=True, self_layers=small, cfg="both", heads="all")
    with r as tr:
        run(pipe, steps=2)
    assert tr.layers_of("cross") == full.layers_of("cross")  # layers=None: every cross layer
    assert tr.layers_of("self") == [n for n in full.layers_of("self") if full.map_size(n)[0] == small]
    assert 0 < len(tr.layers_of("self")) < len(full.layers_of("self"))
    assert r.estimate is not None and r.estimate.total == tr.nbytes
    # a name selector for each kind
    with sdlens.trace(pipe, self_attn=True, layers="up_blocks.*", self_layers="down_blocks.*") as tr:
        run(pipe, steps=1)
    assert tr.layers_of("cross") and all(n.startswith("up_blocks") for n in tr.layers_of("cross"))
    assert tr.layers_of("self") and all(n.startswith("down_blocks") for n in tr.layers_of("self"))
    # clear errors, nothing installed
    with pytest.raises(CaptureError, match="needs self_attn=True"):
        sdlens.trace(pipe, self_layers=16)
    with pytest.raises(CaptureError, match="cross=False"):
        sdlens.trace(pipe, cross=False, self_attn=True, layers=16, self_layers=16)
    with pytest.raises(CaptureError, match="self_layers: 'nope' matches no layer"):
        sdlens.trace(pipe, self_attn=True, self_layers="nope").__enter__()
    with pytest.raises(CaptureError, match="self_layers: no layer has map size 5"):
        with sdlens.trace(pipe, self_attn=True, self_layers=5):
            run(pipe, steps=1)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())


def test_budget_message_points_to_self_layers(sd1_pipe):
    pipe = sd1_pipe
    with pytest.raises(BudgetError, match="self_layers=8 or 16"):
        with sdlens.trace(pipe, self_attn=True, max_bytes=1000):
            run(pipe, steps=1)


# ---------------------------------------------------------------- words, tokens, save/load
def test_word_and_token_maps(tmp_path, sd1_pipe):
    pipe = sd1_pipe
    prompt = "a photorealistic red circle and a red square"
    with sdlens.trace(pipe, heads="all", dtype=torch.float32) as tr:
        run(pipe, prompt=prompt, steps=2)
    tok = tr.tokenization()
    wi = tr.words().index("photorealistic")
    slots = tok.word_tokens[wi]
    assert len(slots) > 1  # split into several BPE tokens
    expected = torch.stack([tr.token_map(s) for s in slots]).mean(0)
    torch.testing.assert_close(tr.word_map("photorealistic"), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(CaptureError, match="occurrence"):
        tr.word_map("red")
    assert not torch.equal(tr.word_map("red", occurrence=0), tr.word_map("red", occurrence=1))
    with pytest.raises(CaptureError, match="photorealistic"):
        tr.word_map("dog")
    # a word map upsamples the per-layer maps: at the layer's own size with one layer it is that layer's mean map
    layer = tr.layers[0]
    h, w = tr.map_size(layer)
    m = tr.maps(layer)[:, 0, :, :, :, 1].mean(dim=(0, 1))
    torch.testing.assert_close(tr.token_map(1, layers=layer, size=(h, w)), m, atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path, sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, self_attn=True, cfg="both", heads="all") as tr:
        pipe(["a red circle", "a blue square"], negative_prompt=["green", "green"], num_inference_steps=2,
             generator=gen(), output_type="latent")
    path = tr.save(tmp_path / "t.safetensors")
    back = sdlens.load_trace(path)
    assert back.prompts == tr.prompts and back.rows == tr.rows and back.steps == tr.steps
    assert back.timesteps == tr.timesteps and back.layers == tr.layers and back.negative_prompts == ["green", "green"]
    assert back.tokenizations == tr.tokenizations and back.image_size == tr.image_size
    for kind, layer in tr.keys():
        assert torch.equal(back.maps(layer, kind), tr.maps(layer, kind))
    torch.testing.assert_close(back.word_map("square", prompt_index=1), tr.word_map("square", prompt_index=1))
    assert back.nbytes == tr.nbytes
    (tmp_path / "bad.safetensors").write_bytes(b"not a trace")
    with pytest.raises(CaptureError, match="not a safetensors file"):
        sdlens.load_trace(tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "t.safetensors"]


# ---------------------------------------------------------------- denoising record
def test_record_latents_and_x0_formulas_match_the_schedulers(sd1_pipe):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from sdlens.capture.denoising import noise_level_and_x0

    x, eps = torch.randn(1, 4, 8, 8, generator=gen(1)), torch.randn(1, 4, 8, 8, generator=gen(2))
    for sched in (
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction", clip_sample=False),
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"),
    ):
        sched.set_timesteps(10)
        t = sched.timesteps[3]
        if isinstance(sched, EulerDiscreteScheduler):
            sched._step_index = 3
        out = sched.step(eps, t, x)
        level, ours = noise_level_and_x0(sched, eps, t, x, None, 3)  # derived, not read from `out`
        torch.testing.assert_close(ours, out.pred_original_sample, atol=1e-4, rtol=1e-4)
        assert 0 < level < 1

    pipe = sd1_pipe
    with sdlens.trace(pipe, record_latents=True, steps=[0, 2]) as tr:
        img = run(pipe, steps=3)
    assert tr.latents.shape == (2, 1, 4, 32, 32) and tr.x0.shape == tr.latents.shape
    assert tr.xt_images.shape == (2, 1, 64, 64, 3) and tr.xt_images.dtype.name == "uint8"
    assert tr.noise_levels[0] > tr.noise_levels[1]
    torch.testing.assert_close(tr.latents[0, 0], torch.randn(1, 4, 32, 32, generator=gen())[0] * pipe.scheduler.init_noise_sigma)
    assert "step" not in vars(pipe.scheduler)
    assert img.shape == (1, 64, 64, 3)


def test_img2img_counts_only_the_steps_it_runs():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd1().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    r = sdlens.trace(pipe, steps=[-1])
    with r as tr:
        pipe(PROMPT, image=image, strength=0.5, num_inference_steps=10, generator=gen(), output_type="latent")
    assert r.n_steps_expected == 5 and tr.num_steps == 5 and tr.steps == [4]


def test_latents_only_trace_installs_no_processor(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, cross=False, record_latents=True) as tr:
        procs = dict(pipe.unet.attn_processors)
        run(pipe, steps=2)
    assert tr.latents.shape[0] == 2 and tr.layers == [] and tr.kinds == ()
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in procs.values())
    with pytest.raises(CaptureError, match="nothing to capture"):
        sdlens.trace(pipe, cross=False)
