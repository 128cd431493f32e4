"""sdlens.edit: each edit's base branch is a plain generation, empty edits are plain generations of
the target, the copied maps are the base's (read back through a capture), bad input is refused
before any denoising with the pipeline left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlens
from sdlens import edit
from sdlens.errors import EditError
from sdlens.tokens import tokenize

KW = {"num_inference_steps": 6, "guidance_scale": 7.5, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe():
    return sdlens.load_pipeline()


def plain(pipe, prompt, seed=0, **kw):
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **{**KW, **kw}).images[0]


def untouched(pipe):
    """A snapshot of what an edit must leave as it found it."""
    return dict(pipe.unet.attn_processors), pipe.scheduler, vars(pipe).get("encode_prompt")


# ------------------------------------------------------------------ alignment


def test_replace_alignment_maps_word_to_word_across_token_counts():
    base = tokenize("a photorealistic red circle")  # "photorealistic" takes two tokens
    target = tokenize("a blue red circle")
    a = edit.replace_alignment(base, target)
    m = a.matrix
    # the two tokens of "photorealistic" (slots 2, 3) both feed "blue" (slot 2), whole
    assert m[2, 2] == 1 and m[3, 2] == 1
    # later words shift by one slot: "red" 4 -> 3, "circle" 5 -> 4, the end 6 -> 5
    assert m[4, 3] == 1 and m[5, 4] == 1 and m[6, 5] == 1
    # every base slot hands on all of its probability
    torch.testing.assert_close(m.sum(1), torch.ones(77))
    assert a.swapped == [("photorealistic", "blue")]
    # a one-token word swapped for a two-token word: half to each
    b = edit.replace_alignment(target, base)
    assert b.matrix[2, 2] == 0.5 and b.matrix[2, 3] == 0.5


def test_replace_alignment_names_the_unmatched_words():
    with pytest.raises(EditError, match=r"unmatched words \[\] in the base and \['big'\] in the target.*refine"):
        edit.replace_alignment(tokenize("a red circle"), tokenize("a big red circle"))


def test_refine_alignment_keeps_shared_words_and_leaves_new_ones_their_own_maps():
    a = edit.refine_alignment(tokenize("a red circle"), tokenize("a big red circle"))
    assert a.added == ["big"]
    assert not a.aligned[2]  # "big" keeps its own map
    assert a.matrix[2, 3] == 1 and a.matrix[3, 4] == 1  # red, circle shift by one
    assert a.aligned[[0, 1, 3, 4, 5]].all()
    with pytest.raises(EditError, match="share none"):
        edit.refine_alignment(tokenize("red"), tokenize("blue"))


# ------------------------------------------------------------------ equalities with plain generations


@pytest.mark.parametrize("make", [
    lambda p: edit.replace(p, "a red circle", "a blue circle", **KW),
    lambda p: edit.refine(p, "a red circle", "a big red circle", **KW),
    lambda p: edit.reweight(p, "a red circle", {"circle": 2.0}, **KW),
    lambda p: edit.inject_self(p, "a red circle", "a blue square", **KW),
    lambda p: edit.inject_self(p, "a red circle", "a blue square", mutual=True, **KW),
    lambda p: edit.replace(p, "a red circle", "a blue circle", blend="circle", **KW),
], ids=["replace", "refine", "reweight", "inject_self", "mutual", "blend"])
def test_the_base_branch_is_a_plain_generation_of_the_base_prompt(pipe, make):
    before = untouched(pipe)
    result = make(pipe)
    assert np.abs(result.images[0] - plain(pipe, "a red circle")).max() <= 1e-4
    assert untouched(pipe) == before


def test_empty_windows_give_a_plain_generation_of_the_target(pipe):
    result = edit.replace(pipe, "a red circle on the left", "a blue square on the left", cross_window=0, self_window=0, **KW)
    assert np.abs(result.images[1] - plain(pipe, "a blue square on the left")).max() <= 1e-4
    # and an edit that acts changes the picture
    acted = edit.replace(pipe, "a red circle on the left", "a blue square on the left", **KW)
    assert np.abs(acted.images[1] - result.images[1]).max() > 0.05


def test_weights_of_one_change_nothing(pipe):
    a = edit.replace(pipe, "a big red circle", "a big blue circle", **KW)
    b = edit.replace(pipe, "a big red circle", "a big blue circle", weights={"big": 1.0, "blue": 1.0}, **KW)
    assert np.abs(a.images[1] - b.images[1]).max() <= 1e-4  # the weighted run computes every step explicitly
    c = edit.reweight(pipe, "a big red circle", {"big": 1.0}, **KW)
    assert np.abs(c.images[1] - c.images[0]).max() <= 1e-4
    d = edit.reweight(pipe, "a big red circle", {"big": 3.0}, **KW)
    assert np.abs(d.images[1] - d.images[0]).max() > 0.01


def test_replace_copies_the_base_maps_into_the_edited_branch(pipe):
    """Read back through a capture: with cross_window=1, every cross-attention map of the edited
    prompt equals the base prompt's (one token per word, so the mapping is the identity), and with
    cross_window=0 they differ; the capture does not change the images."""
    r = edit.replace(pipe, "a red circle", "a blue square", cross_window=1.0, self_window=0, trace=True, **KW)
    tr = r.trace
    assert tr.prompts == ["a red circle", "a blue square"]
    for layer in tr.layers_of("cross"):
        maps = tr.maps(layer, "cross").float()  # (steps, rows, heads, h, w, slots)
        torch.testing.assert_close(maps[:, 1], maps[:, 0], atol=2e-3, rtol=0)  # stored in float16
    alone = edit.replace(pipe, "a red circle", "a blue square", cross_window=1.0, self_window=0, **KW)
    assert np.abs(alone.images[1] - r.images[1]).max() <= 1e-5
    off = edit.replace(pipe, "a red circle", "a blue square", cross_window=0, self_window=0, trace=True, **KW).trace
    layer = off.layers_of("cross")[0]
    assert (off.maps(layer, "cross")[:, 1].float() - off.maps(layer, "cross")[:, 0].float()).abs().max() > 1e-2


def test_traces_give_each_branch_as_its_own_trace(pipe, tmp_path):
    """``.traces[k]`` is branch ``k`` alone: the same maps, tokens and recorded latents as prompt ``k``
    of the one trace, and it saves and loads like any trace."""
    r = edit.refine(pipe, "a red circle", "a big red square", trace={"record_latents": True}, **KW)
    tr, (base, edited) = r.trace, r.traces
    assert (base.prompts, edited.prompts) == (["a red circle"], ["a big red square"])
    assert edited.words() == ["a", "big", "red", "square"] and edited.negative_prompts == [""]
    for k, one in enumerate(r.traces):
        assert [(row.half, row.prompt) for row in one.rows] == [("uncond", 0), ("cond", 0)][-len(one.rows):]
        for word in one.words():
            torch.testing.assert_close(one.word_map(word), tr.word_map(word, prompt_index=k))
        torch.testing.assert_close(one.latents[:, 0], tr.latents[:, k])
    torch.testing.assert_close(edited.word_map("red"), base.word_map("red"), atol=2e-3, rtol=0)  # copied by refine
    assert "big" not in base.words() and not torch.equal(base.latents, edited.latents)
    again = sdlens.load_trace(edited.save(tmp_path / "edit.safetensors"))
    torch.testing.assert_close(again.word_map("big"), edited.word_map("big"))
    assert edit.replace(pipe, "a red circle", "a blue circle", **KW).traces is None
    with pytest.raises(sdlens.CaptureError, match="prompts 0..1"):
        tr.of_prompt(2)


def test_per_word_windows_and_pairs(pipe):
    r = edit.replace(pipe, "a red circle", "a blue circle", cross_window={"blue": (0.0, 0.5), "default": 1.0},
                     self_window=(0.1, 0.3), **KW)
    assert r.settings["self_window"] == (0.1, 0.3)
    assert r.settings["cross_window"] == {"blue": (0.0, 0.5), "default": 1.0}


def test_blend_keeps_the_base_latent_outside_the_mask_at_every_blended_step(pipe):
    base, target = "a red circle on the left", "a blue circle on the left"
    seen = []

    def record(p, i, t, kwargs):  # called after the blend, with the blended latents
        seen.append((i, kwargs["latents"].clone()))
        return {}

    r = edit.replace(pipe, base, target, blend={"words": ["circle"], "start": 0.5}, callback_on_step_end=record, **KW)
    mask = r.masks[0, 0]  # the last step's mask (it only grows with the steps' sum here: compare the last step)
    assert 0 < float(mask.mean()) < 0.6  # a region around the circle, not the whole latent
    i, last = seen[-1]
    assert i == KW["num_inference_steps"] - 1
    outside = (last[1] - last[0]).abs() * (1 - mask)
    assert outside.max() == 0
    assert ((last[1] - last[0]).abs() * mask).max() > 0.1  # inside, the edit
    # before the start, no blending: the branches differ outside the (later) mask too
    first = seen[0][1]
    assert ((first[1] - first[0]).abs() * (1 - mask)).max() > 0
    # threshold 0 keeps the whole edit: the same as no blend
    everything = edit.replace(pipe, base, target, blend={"words": ["circle"], "threshold": 0.0}, **KW)
    free = edit.replace(pipe, base, target, **KW)
    assert np.abs(everything.images[1] - free.images[1]).max() <= 1e-5


def test_capture_and_edit_together_give_the_edit_alone(pipe):
    args = ("a red circle on the left", "a blue circle on the left")
    a = edit.replace(pipe, *args, blend="circle", **KW)
    b = edit.replace(pipe, *args, blend="circle", trace={"self_attn": True, "layers": 8}, **KW)
    assert np.abs(a.images[1] - b.images[1]).max() <= 1e-5
    assert tuple(b.trace.kinds) == ("cross", "self")


def test_non_square_and_several_targets(pipe):
    r = edit.replace(pipe, "a red circle", ["a blue circle", "a green circle"], height=64, width=96, **KW)
    assert len(r.images) == 3 and r.images[0].shape == (64, 96, 3)
    assert np.abs(r.images[0] - plain(pipe, "a red circle", height=64, width=96)).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_keeps_the_base(sd1_pipe, dtype):
    pipe = sd1_pipe.to(dtype=dtype)
    try:
        r = edit.replace(pipe, "a red circle", "a blue circle", blend="circle", num_inference_steps=3, output_type="np")
        p = pipe("a red circle", num_inference_steps=3, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
        assert np.isfinite(r.images).all()
        # half precision: the edited layers' float32 softmax differs from SDPA's in the last bits,
        # which random weights amplify; the base stays close
        assert np.abs(r.images[0] - p).max() <= 0.1
        # null-text tuning runs in the pipeline's precision too (the embedding is tuned in float32)
        h = pipe.unet.config.sample_size * pipe.vae_scale_factor
        picture = np.random.default_rng(0).integers(0, 256, (h, h, 3), dtype=np.uint8)
        real = edit.replace(pipe, "a red circle", "a blue circle", image=picture, inversion="null-text",
                            num_inference_steps=2, output_type="np")
        assert np.isfinite(real.images).all() and real.inversion.null_embeddings.dtype == dtype
    finally:
        sd1_pipe.to(dtype=torch.float32)


# ------------------------------------------------------------------ real images


def test_a_rendered_image_is_inverted_reconstructed_and_edited(pipe):
    from sdlens.world import analyze, parse_caption, render

    scene = render(parse_caption("a red circle on the left"), size=64, seed=0)
    r = edit.replace(pipe, "a red circle on the left", "a blue circle on the left", image=scene.image,
                     num_inference_steps=20, guidance_scale=1.0, output_type="np")
    assert r.reconstruction_error < 0.05, r.reconstruction_error
    found = analyze((r.images[0] * 255).round().astype(np.uint8))
    assert [(d.color, d.shape) for d in found] == [("red", "circle")]
    assert r.settings["image"]["inversion"] == "ddim"
    edited = analyze((r.images[1] * 255).round().astype(np.uint8))
    assert [(d.color, d.shape) for d in edited] == [("blue", "circle")]


def test_real_image_edit_puts_the_scheduler_back(pipe):
    from sdlens.world import parse_caption, render

    before = untouched(pipe)
    image = render(parse_caption("a red circle"), size=64, seed=0).image
    edit.replace(pipe, "a red circle", "a blue circle", image=image, num_inference_steps=4, output_type="np")
    assert untouched(pipe) == before


def test_the_samplers_ddim_step_carries_the_gradient_the_null_text_tuning_needs(pipe):
    """The tuning backpropagates through the DDIM sampler's own step: at every timestep the step is
    differentiable in the noise prediction, with the exact coefficient √(1-ᾱ_prev) - √ᾱ_prev·√(1-ᾱ_t)/√ᾱ_t."""
    from sdlens.edit.inversion import ddim_pair

    sampler, _ = ddim_pair(pipe.scheduler)
    sampler.set_timesteps(7)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sampler.timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(int(t))).requires_grad_(True)
        sampler.step(eps, t, x).prev_sample.sum().backward()
        a_t = sampler.alphas_cumprod[int(t)]
        prev = int(t) - sampler.config.num_train_timesteps // sampler.num_inference_steps
        a_prev = sampler.alphas_cumprod[prev] if prev >= 0 else sampler.final_alpha_cumprod
        coefficient = (1 - a_prev) ** 0.5 - a_prev**0.5 * (1 - a_t) ** 0.5 / a_t**0.5
        torch.testing.assert_close(eps.grad, torch.full_like(eps, float(coefficient)))


@pytest.mark.slow  # 15 s: ten tuned steps, twice
def test_null_text_inversion_reconstructs_better_at_high_guidance_and_leaves_no_trace(pipe):
    """Null-text tuning lowers the reconstruction error that DDIM inversion has at guidance 7.5; an
    Inversion made once edits like the image itself; the UNet keeps no hook and no gradient flag."""
    from sdlens.world import parse_caption, render

    scene = render(parse_caption("a green square on the right"), size=64, seed=3)
    kw = {"num_inference_steps": 10, "guidance_scale": 7.5, "output_type": "np"}
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    before = untouched(pipe)
    ddim = edit.replace(pipe, "a green square on the right", "a red square on the right", image=scene.image, **kw)
    inv = edit.invert(pipe, scene.image, "a green square on the right", (16, 16), num_inference_steps=10,
                      guidance_scale=7.5, inversion="null-text")
    assert inv.null_embeddings.shape[:2] == (10, 1)
    null = edit.replace(pipe, "a green square on the right", "a red square on the right", image=inv, **kw)
    assert null.settings["image"]["inversion"] == "null-text"
    assert null.reconstruction_error < 0.7 * ddim.reconstruction_error, (null.reconstruction_error,
                                                                         ddim.reconstruction_error)
    again = edit.replace(pipe, "a green square on the right", "a red square on the right", image=scene.image,
                         inversion="null-text", **kw)
    assert np.abs(again.images[1] - null.images[1]).max() <= 1e-5
    assert untouched(pipe) == before and not pipe.unet._forward_pre_hooks
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads


def test_an_inversion_that_does_not_fit_the_edit_is_refused(pipe):
    from sdlens.world import parse_caption, render

    image = render(parse_caption("a red circle"), size=64, seed=0).image
    inv = edit.invert(pipe, image, "a red circle", (16, 16), num_inference_steps=3)
    with pytest.raises(EditError, match=r"inverted with the prompt 'a red circle'.*inverted over 3 steps, and the edit runs 4"):
        edit.replace(pipe, "a red square", "a blue square", image=inv, num_inference_steps=4)
    with pytest.raises(EditError, match="made by 'ddim'"):
        edit.replace(pipe, "a red circle", "a blue circle", image=inv, inversion="null-text")
    r = edit.replace(pipe, "a red circle", "a blue circle", image=inv, output_type="np")  # its steps filled in
    assert r.settings["num_inference_steps"] == 3


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("call", "message"), [
    (lambda p: edit.replace(p, "a red circle", "a blue circle", cross_window=1.5), r"fractions must lie in \[0, 1\]"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", self_window=(0.5, 0.2)), "start ≤ end"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", cross_window="all"), "a step fraction"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", cross_window={"green": 0.5}), "'green' is not a word"),
    (lambda p: edit.reweight(p, "a red circle", {"big": 2.0}), "'big' is not a word"),
    (lambda p: edit.reweight(p, "a red circle", {"red": float("nan")}), "finite number"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", blend="square"), "in none of the prompts"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", blend={"words": "circle", "size": 32}),
     r"valid: \[8, 16\]"),
    (lambda p: edit.replace(p, "a red circle", "a big blue circle"), "unmatched words"),
    (lambda p: edit.replace(p, "a red circle", "A red  circle"), "nothing to swap"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", latents=None), "cannot be passed"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", self_window=0.5, self_max_size=4), "self_max_size=4"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", image=np.zeros((32, 32, 3), np.uint8)), "32×32"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", image=np.zeros((64, 64), np.uint8)), r"\(H, W, 3\)"),
    (lambda p: edit.replace(p, "", "a blue circle"), "non-empty"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", inversion="exact"), "choose one of: 'ddim', 'null-text'"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", image=np.zeros((64, 64, 3), np.uint8),
                            inversion="null-text", guidance_scale=1.0), "guidance_scale > 1"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", image=np.zeros((64, 64, 3), np.uint8),
                            inversion="null-text", negative_prompt="green"), "drop negative_prompt"),
    (lambda p: edit.replace(p, "a red circle", "a blue circle", trace={"colour": True}), "trace="),
])
def test_bad_input_is_refused_before_denoising_and_leaves_the_pipeline_as_it_was(pipe, call, message):
    before = untouched(pipe)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(EditError, match=message):
            call(pipe)
    finally:
        handle.remove()
    assert calls == [] and untouched(pipe) == before


def test_pil_image_mode_is_checked(pipe):
    from PIL import Image

    with pytest.raises(EditError, match="mode 'L'"):
        edit.replace(pipe, "a red circle", "a blue circle", image=Image.new("L", (64, 64)))


def test_processors_are_restored_after_an_exception_mid_run(pipe):
    before = untouched(pipe)

    def boom(p, i, t, kwargs):
        if i == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        edit.replace(pipe, "a red circle", "a blue circle", blend="circle", callback_on_step_end=boom, **KW)
    assert untouched(pipe) == before
    # the null-text hook goes too (embeddings made up: only their removal is checked here)
    from sdlens.world import parse_caption, render

    inv = edit.invert(pipe, render(parse_caption("a red circle"), size=64, seed=0).image, "a red circle", (16, 16),
                      num_inference_steps=KW["num_inference_steps"])
    empty = pipe.text_encoder(pipe.tokenizer([""], padding="max_length", return_tensors="pt").input_ids)[0]
    inv.null_embeddings = empty.detach().expand(KW["num_inference_steps"], *empty.shape).clone()
    with pytest.raises(KeyboardInterrupt):
        edit.replace(pipe, "a red circle", "a blue circle", image=inv, callback_on_step_end=boom, **KW)
    assert untouched(pipe) == before and not pipe.unet._forward_pre_hooks
    # and the pipeline still generates as before
    assert np.abs(edit.replace(pipe, "a red circle", "a blue circle", **KW).images[0] - plain(pipe, "a red circle")).max() <= 1e-4


# ------------------------------------------------------------------ the command and the explorer


def test_sdlens_edit_writes_the_pictures(tmp_path, capsys):
    from sdlens.cli import main

    out = tmp_path / "e"
    rc = main(["edit", "a red circle and a blue square", "a green circle and a blue square", "--out", str(out),
               "--num-inference-steps", "4", "--blend", "circle", "--weights", "green=2", "--trace", "--no-progress"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["base.png", "edit.png", "mask.png", "settings.json", "side.png", "trace.safetensors",
                     "words-base.png", "words-edit.png"]
    import json

    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "replace" and settings["weights"] == {"green": 2.0}
    assert sdlens.load_trace(out / "trace.safetensors").prompts == ["a red circle and a blue square",
                                                                     "a green circle and a blue square"]


def test_sdlens_edit_on_an_image_file(tmp_path):
    from PIL import Image

    from sdlens.cli import main
    from sdlens.world import parse_caption, render

    path = tmp_path / "scene.png"
    Image.fromarray(render(parse_caption("a red circle on the left"), size=64, seed=1).image).convert("RGBA").save(path)
    out = tmp_path / "real"
    assert main(["edit", "a red circle on the left", "a blue circle on the left", "--image", str(path),
                 "--out", str(out), "--num-inference-steps", "10", "--guidance-scale", "1", "--no-progress"]) == 0
    import json

    assert json.loads((out / "settings.json").read_text())["reconstruction_error"] < 0.05


@pytest.mark.parametrize(("args", "message"), [
    (["a red circle", "a blue circle", "--method", "swap"], "invalid choice"),
    (["a red circle", "a blue circle", "--cross-window", "lots"], "--cross-window 'lots'"),
    (["a red circle", "a blue circle", "--cross-window", "1.5"], r"\[0, 1\]"),
    (["a red circle", "a blue circle", "--weights", "big"], "WORD=VALUE"),
    (["a red circle", "a blue circle", "--weights", "big=2"], "'big' is not a word"),
    (["a red circle", "a blue circle", "--threshold", "0.5"], "--blend"),
    (["a red circle", "--method", "reweight"], "--weights"),
    (["a red circle", "a big blue circle"], "unmatched words"),
    (["a red circle", "a blue circle", "--image", "nowhere.png"], "no such file"),
    (["a red circle", "a blue circle", "--size", "60"], "multiples of 8"),
    (["a red circle", "a blue circle", "--inversion", "null-text"], "give --image"),
    (["a red circle", "a blue circle", "--inversion", "exact"], "invalid choice"),
])
def test_sdlens_edit_bad_arguments_give_one_line_and_write_nothing(tmp_path, capsys, args, message):
    import re

    from sdlens.cli import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit) if "invalid choice" in message else _nothing():
        rc = main(["edit", *args, "--out", str(out), "--no-progress"])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err
    if "invalid choice" not in message:
        assert len(err) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".sdlens")]


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_edit_explorer_reruns_on_release_and_caches(pipe):
    from sdlens.widgets import EditExplorer

    ex = EditExplorer(pipe, "a red circle", "a blue circle", seed=3, num_inference_steps=4)
    assert ex.edits == 1 and ex.render().shape == (64, 64 * 2 + 4, 3)
    direct = edit.replace(pipe, "a red circle", "a blue circle", seed=3, num_inference_steps=4, output_type="np")
    assert np.abs(ex.result.images[1] - direct.images[1]).max() <= 1e-5
    ex.controls["blend"].value = True  # the mask appears beside the pictures
    assert ex.edits == 2 and ex.last.shape == (64, 64 * 3 + 8, 3)
    ex.controls["weight:blue"].value = 3.0
    assert ex.edits == 3 and ex.settings()["weights"] == {"blue": 3.0}
    ex.controls["weight:blue"].value = 1.0  # back to a setting seen before: from the cache
    assert ex.edits == 3
    assert all(getattr(w, "continuous_update", False) is False for w in ex.controls.values()
               if isinstance(w, (ipywidgets_module().FloatSlider, ipywidgets_module().FloatRangeSlider)))


def test_edit_explorer_on_an_image_inverts_once(pipe):
    from sdlens.widgets import EditExplorer
    from sdlens.world import parse_caption, render

    image = render(parse_caption("a red circle on the left"), size=64, seed=1).image
    ex = EditExplorer(pipe, "a red circle on the left", "a blue circle on the left", image=image, num_inference_steps=4)
    inversion = ex.inversion
    direct = edit.replace(pipe, "a red circle on the left", "a blue circle on the left", image=image,
                          num_inference_steps=4, guidance_scale=7.5, output_type="np")
    for a, b in zip(ex.result.images, direct.images):
        assert np.abs(a - b).max() <= 1e-5
    ex.controls["blend"].value = True
    assert ex.edits == 2 and ex.inversion is inversion and "reconstructed" in ex.describe()


def ipywidgets_module():
    import ipywidgets

    return ipywidgets


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_unet_families_keep_the_base_and_restore(family):
    from sdlens.models.families import FAMILIES

    pipe = FAMILIES[family]()
    before = dict(pipe.unet.attn_processors)
    r = edit.replace(pipe, "a red circle", "a blue circle", blend="circle", self_window=0.5, num_inference_steps=3,
                     output_type="np")
    p = pipe("a red circle", num_inference_steps=3, output_type="np", generator=torch.Generator("cpu").manual_seed(0))
    assert np.abs(r.images[0] - p.images[0]).max() <= 1e-4
    assert dict(pipe.unet.attn_processors) == before


def test_a_pipeline_without_a_denoiser_is_refused_with_the_supported_families():
    class NoDenoiser:  # e.g. a text-only pipeline: a tokenizer, no unet or transformer
        tokenizer = object()

    with pytest.raises(EditError, match="SD 1.x/2.x/SDXL .* and SD 3"):
        edit.replace(NoDenoiser(), "a red circle", "a blue circle")
    # SD 3 itself is supported (tests/test_sd3.py edits through its joint attention)
