"""Tracing the pipelines people really run: PAG, torch.compile, interrupted steps, bare denoisers,
sibling pipelines, SDXL's second prompt, truncated prompts and damaged trace files.

Each case: the right maps (against diffusers' explicit softmax, or the same run traced the ordinary
way), or a clear error; and the pipeline left exactly as it was.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _reference import reference_cross_maps
from _runs import PROMPT, gen, run
from diffusers import AutoPipelineForText2Image, StableDiffusionImg2ImgPipeline
from safetensors import safe_open
from safetensors.torch import save_file

import sdlens
from sdlens import BudgetError, CaptureError
from sdlens.errors import TraceWarning
from sdlens.models.families import FAMILIES, sd1


def processors(denoiser) -> dict:
    return dict(denoiser.attn_processors)


def unchanged(denoiser, before: dict) -> bool:
    after = denoiser.attn_processors
    return after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# ---------------------------------------------------------------- 1. PAG: processors set by the pipeline
def test_pag_is_traced_with_its_own_processors_and_rows_labelled(sd1_pipe):
    pag = AutoPipelineForText2Image.from_pipe(sd1_pipe, enable_pag=True)  # PAG on the mid block's self-attention
    before = processors(pag.unet)
    untraced = run(pag)
    no_pag = run(sd1_pipe)
    with sdlens.trace(pag, cfg="all", heads="all", dtype=torch.float32) as tr:
        traced = run(pag)
    assert abs(traced - untraced).max() <= 1e-4 < abs(untraced - no_pag).max()  # PAG ran, traced
    assert [r.half for r in tr.rows] == ["uncond", "cond", "perturbed"]
    assert unchanged(pag.unet, before)
    ref = reference_cross_maps(pag, lambda: run(pag))  # diffusers' explicit softmax, rows in batch order
    for layer, expected in ref.items():
        ours = tr.maps(layer).flatten(3, 4).flatten(1, 2)  # (steps, rows·heads, n, 77)
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    # the default keeps the conditional row: word_map shows the prompt's attention, not the negative prompt's
    with sdlens.trace(pag, dtype=torch.float32) as cond:
        run(pag)
    assert cond.rows == [tr.rows[1]]
    torch.testing.assert_close(cond.word_map("circle"), tr.word_map("circle"))
    assert not torch.allclose(tr.word_map("circle"), tr.slot_map([3], half="uncond"))


def test_pag_perturbed_self_attention_is_refused_not_invented(sd1_pipe):
    pag = AutoPipelineForText2Image.from_pipe(sd1_pipe, enable_pag=True)
    before = processors(pag.unet)
    with pytest.raises(CaptureError, match=r"mid_block.*identity"):
        with sdlens.trace(pag, self_attn=True, cfg="all"):
            run(pag)
    assert unchanged(pag.unet, before)
    with sdlens.trace(pag, self_attn=True, cfg="both") as tr:  # the other rows: real maps
        run(pag)
    assert any(n.startswith("mid_block") for n in tr.layers_of("self"))
    with pytest.raises(CaptureError, match="does not use"):
        with sdlens.trace(sd1_pipe, cfg="perturbed"):
            run(sd1_pipe, steps=1)


def test_a_processor_set_inside_the_trace_is_respected(sd1_pipe):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = sd1_pipe
    before = processors(pipe.unet)
    custom = AttnProcessor()
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with sdlens.trace(pipe, dtype=torch.float32) as tr:
        pipe.unet.set_attn_processor({**before, f"{layer}.processor": custom})  # the user's own, for this run
        traced = run(pipe)
    # the user set it inside the block: it stays, and was the one traced; the rest is as before the trace
    assert pipe.unet.attn_processors[f"{layer}.processor"] is custom
    pipe.unet.set_attn_processor(before)
    torch.testing.assert_close(tr.maps(layer).sum(-1), torch.ones_like(tr.maps(layer).sum(-1)))
    assert abs(traced - run(pipe)).max() <= 1e-4


# ---------------------------------------------------------------- 2. torch.compile
def test_a_compiled_unet_is_traced_through_its_original_module():
    pipe = sd1()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    compiled = pipe.unet
    before_out = run(pipe)
    original = processors(compiled._orig_mod)
    with sdlens.trace(pipe, dtype=torch.float32) as tr:
        traced = run(pipe)
    assert pipe.unet is compiled and unchanged(compiled._orig_mod, original)
    assert abs(traced - before_out).max() <= 1e-4 and tr.layers
    torch.testing.assert_close(tr.word_map("circle"), tr.word_map("circle"))
    for layer in tr.layers:
        s = tr.maps(layer).float().sum(-1)
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    assert (run(pipe) == before_out).all()  # the compiled module gives what it gave before
    with pytest.raises(CaptureError, match="torch.compile"):
        sdlens.trace(compiled)


# ---------------------------------------------------------------- 3. interrupted in the middle of a step
@pytest.mark.parametrize("exc", [RuntimeError("the UNet failed"), KeyboardInterrupt()])
def test_a_step_interrupted_inside_the_unet_is_dropped_from_every_layer(sd1_pipe, tmp_path, exc):
    pipe = sd1_pipe
    before = processors(pipe.unet)
    with sdlens.trace(pipe, dtype=torch.float32) as full:
        run(pipe, steps=3)
    calls = []

    def fail_at_step_1(module, args, output):  # after the down blocks' layers ran, before the up blocks'
        calls.append(1)
        if len(calls) == 2:
            raise exc

    h = pipe.unet.mid_block.register_forward_hook(fail_at_step_1)
    try:
        with pytest.raises(type(exc)):
            with sdlens.trace(pipe, dtype=torch.float32) as part:
                run(pipe, steps=3)
    finally:
        h.remove()
    assert unchanged(pipe.unet, before)
    assert part.steps == [0] and part.num_steps == 1 and len(part.timesteps) == 1
    assert part.layers == full.layers
    for layer in full.layers:  # every layer holds exactly the completed step, as the full run made it
        torch.testing.assert_close(part.maps(layer), full.maps(layer)[:1], atol=0, rtol=0)
    back = sdlens.load_trace(part.save(tmp_path / "part.safetensors"))
    torch.testing.assert_close(back.word_map("circle"), full.word_map("circle", steps=[0]))


# ---------------------------------------------------------------- 4. a bare denoiser
def test_a_bare_denoiser_with_prompt_knows_its_words_and_rows(sd1_pipe):
    pipe = sd1_pipe
    with sdlens.trace(pipe, cfg="both", dtype=torch.float32) as ref:
        run(pipe)
    with sdlens.trace(pipe.unet, prompt=PROMPT, cfg="both", dtype=torch.float32) as bare:
        run(pipe)
    assert bare.words() == ref.words() and [r.half for r in bare.rows] == ["uncond", "cond"]
    for layer in ref.layers:
        torch.testing.assert_close(bare.maps(layer), ref.maps(layer), atol=0, rtol=0)
    assert bare.image_size == bare.latent_size  # a bare denoiser does not know the VAE's factor
    torch.testing.assert_close(bare.word_map("circle", size=(64, 64)), ref.word_map("circle"))
    before = processors(pipe.unet)
    with pytest.raises(CaptureError, match=r"prompt=\["):  # rows of a CFG batch with no prompts: not guessed
        with sdlens.trace(pipe.unet):
            run(pipe)
    assert unchanged(pipe.unet, before)


def test_a_bare_denoisers_budget_is_checked_before_each_step(sd1_pipe):
    pipe = sd1_pipe
    calls = []
    h = pipe.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(BudgetError, match="about"):  # one step is over budget: before the first forward
            with sdlens.trace(pipe.unet, prompt=PROMPT, self_attn=True, max_bytes=1000):
                run(pipe)
        assert calls == []
        with sdlens.trace(pipe.unet, prompt=PROMPT) as one:
            run(pipe, steps=1)
        per_step = one.nbytes
        tracer = sdlens.trace(pipe.unet, prompt=PROMPT, max_bytes=2.5 * per_step)
        with pytest.raises(BudgetError, match="at step 2"):  # refused before step 2 computes anything
            with tracer as tr:
                run(pipe, steps=5)
        assert tr.steps == [0, 1] and tr.nbytes == 2 * per_step
        assert len(calls) == 1 + 2  # the one-step run, then steps 0 and 1
    finally:
        h.remove()


# ---------------------------------------------------------------- 5. a sibling pipeline sharing the UNet
def test_steps_resolve_against_the_run_of_a_pipeline_sharing_the_unet(sd1_pipe):
    pipe = sd1_pipe
    run(pipe, steps=25)  # the traced pipeline's last call made 25 steps
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=gen(3))
    before = processors(pipe.unet)

    def sibling():
        return img2img(PROMPT, image=image, strength=0.5, num_inference_steps=10, generator=gen(), output_type="np")

    with sdlens.trace(img2img, steps=[-1], dtype=torch.float32) as direct:
        sibling()
    with sdlens.trace(pipe, steps=[-1], prompt=PROMPT, dtype=torch.float32) as tr:
        sibling()
    assert direct.steps == tr.steps == [4] and tr.num_steps == 5
    for layer in direct.layers:
        torch.testing.assert_close(tr.maps(layer), direct.maps(layer), atol=0, rtol=0)
    assert tr.words() == direct.words()
    with pytest.raises(CaptureError, match="another pipeline|other than the traced one"):
        with sdlens.trace(pipe):
            sibling()
    assert unchanged(pipe.unet, before)


def test_a_run_that_captures_nothing_says_so(sd1_pipe):
    with pytest.warns(TraceWarning, match=r"steps \[7\] never came") as record:
        with sdlens.trace(sd1_pipe.unet, prompt=PROMPT, steps=[7]) as tr:  # a bare denoiser: 3 steps come
            run(sd1_pipe)
    assert tr.steps == [] and record[0].filename == __file__  # it points at the user's `with` block
    with pytest.warns(TraceWarning, match="not called"):
        with sdlens.trace(sd1_pipe):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and a run that keeps what it asked for says nothing
        with sdlens.trace(sd1_pipe, steps=[-1]):
            run(sd1_pipe)


# ---------------------------------------------------------------- SDXL's second prompt, truncation
def test_sdxl_second_prompt_is_tokenized_and_mappable():
    pipe = FAMILIES["sdxl"]()
    with sdlens.trace(pipe, dtype=torch.float32) as tr:
        pipe("a red circle", prompt_2="a blue square", num_inference_steps=2, height=64, width=64,
             generator=gen(), output_type="latent")
    assert tr.words() == ["a", "red", "circle"] and tr.words(encoder=2) == ["a", "blue", "square"]
    slots = tr.tokenization(encoder=2).word_tokens[2]
    torch.testing.assert_close(tr.word_map("square", encoder=2), tr.slot_map(slots))
    with pytest.raises(CaptureError, match="encoder=2"):
        tr.word_map("square")
    with sdlens.trace(pipe) as same:  # no prompt_2: the second encoder reads the prompt
        pipe("a red circle", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert same.words(encoder=2) == same.words()


def test_a_truncated_word_is_named_as_truncated(sd1_pipe):
    prompt = " ".join(["red"] * 80) + " zebra"
    with sdlens.trace(sd1_pipe) as tr:
        run(sd1_pipe, prompt=prompt, steps=1)
    with pytest.raises(CaptureError, match=r"'zebra' was cut off.*77 slots"):
        tr.word_map("zebra")
    with pytest.raises(CaptureError, match="not a word of this prompt"):
        tr.word_map("giraffe")


# ---------------------------------------------------------------- damaged and malformed trace files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = sd1()
    with sdlens.trace(pipe) as tr:
        run(pipe, steps=2)
    return tr.save(tmp_path_factory.mktemp("t") / "ok.safetensors")


def _rewrite(src, dst, change_meta=None, change_tensors=None):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        meta = change_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _meta(edit):
    def change(meta):
        m = json.loads(meta["sdlens"])
        edit(m)
        return {"sdlens": json.dumps(m)}
    return change


def test_a_damaged_trace_file_is_refused(saved, tmp_path):
    assert sdlens.load_trace(saved).steps == [0, 1]
    raw = bytearray(saved.read_bytes())
    raw[-100] ^= 0xFF  # one byte of the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CaptureError, match=r"bad.safetensors' is damaged"):
        sdlens.load_trace(bad)

    def nan(tensors):
        k = next(iter(tensors))
        tensors[k][0, 0, 0, 0, 0] = float("nan")

    with pytest.raises(CaptureError, match="damaged"):
        sdlens.load_trace(_rewrite(saved, tmp_path / "nan.safetensors", change_tensors=nan))


@pytest.mark.parametrize("what, edit, message", [
    ("no key_labels", lambda m: m.pop("key_labels"), "key_labels"),
    ("no format version", lambda m: m.pop("format_version"), "format"),
    ("a newer format", lambda m: m.update(format_version=99), "versions 1..2"),
    ("rows of the wrong type", lambda m: m.update(rows=[3]), "malformed"),
])
def test_malformed_metadata_names_the_file_and_what_is_wrong(saved, tmp_path, what, edit, message):
    path = _rewrite(saved, tmp_path / "m.safetensors", change_meta=_meta(edit))
    with pytest.raises(CaptureError, match=message) as e:
        sdlens.load_trace(path)
    assert "m.safetensors" in str(e.value)


def test_unreadable_metadata_and_devices(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "j.safetensors", change_meta=lambda m: {"sdlens": "{not json"})
    with pytest.raises(CaptureError, match="j.safetensors.*not valid JSON"):
        sdlens.load_trace(path)
    if not torch.cuda.is_available():
        with pytest.raises(CaptureError, match="no CUDA device"):
            sdlens.load_trace(saved, device="cuda")
    with pytest.raises(CaptureError, match="not a torch device"):
        sdlens.load_trace(saved, device="gpu0")


def test_bad_steps_and_budgets_are_named_whole(sd1_pipe):
    with pytest.raises(CaptureError, match="got 'last'"):
        sdlens.trace(sd1_pipe, steps="last")
    with pytest.raises(CaptureError, match=r"got 1\.5 in \[0, 1\.5\]"):
        sdlens.trace(sd1_pipe, steps=[0, 1.5])
    for bad in (0, -5):
        with pytest.raises(BudgetError, match=f"max_bytes={bad}"):
            sdlens.trace(sd1_pipe, max_bytes=bad)
