"""The exercises' checks and hints: right answers pass, wrong ones fail with the true answer, and
every exercise of the lessons has a check or a hint."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

import sdlens
from sdlens import classroom

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def tiny():
    return sdlens.load_pipeline("tiny")


def test_checks_compute_the_answer_and_say_why(tiny):
    right = classroom.check_slots("a red circle", 5, tiny.tokenizer)
    wrong = classroom.check_slots("a red circle", 4, tiny.tokenizer)
    assert right.right and wrong.right is False and "5 slots" in wrong.message
    assert classroom.check_slots("a red circle", None).right is None
    assert classroom.check_guidance_batch(tiny, 1).right and not classroom.check_guidance_batch(tiny, 2).right
    assert classroom.check_scale(tiny, "Sharper ").right and classroom.check_scale(tiny, "flatter").right is False


def test_joint_tokens_count_patches_and_text():
    pipe3 = sdlens.load_pipeline("tiny-sd3")
    n = classroom.joint_tokens(pipe3)
    assert n == (16 // 2) ** 2 + pipe3.tokenizer.model_max_length + 256
    assert classroom.check_joint_tokens(pipe3, n, 4429, 4429 ** 2).right
    assert classroom.check_joint_tokens(pipe3, n, 4096, 4096 ** 2).right is False
    assert classroom.check_joint_tokens(pipe3, n, None, None).right is None


def test_every_exercise_has_a_check_or_a_hint():
    checks = {"01.4", "02.2", "02.3", "02.5", "03.3", "03.4", "04.1", "04.3", "04.6"}
    for name in sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb")):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4)
        text = next(c.source for c in nb.cells if c.cell_type == "markdown" and "## Exercises" in c.source)
        numbers = re.findall(r"^(\d+)\. ", text.split("## Exercises")[1], re.M)
        assert numbers, name
        for n in numbers:
            key = f"{name[:2]}.{n}"
            assert key in checks or key in classroom.HINTS, key
    with pytest.raises(KeyError, match="exercises with hints"):
        classroom.hint("09.1")



def test_latent_shift_is_the_vae_factor(tiny):
    """02.2: the truth, the decoder's measured shift, is the VAE's downsampling counted from its config."""
    factor = 2 ** (len(tiny.vae.config.block_out_channels) - 1)
    assert classroom.latent_shift(tiny) == factor
    assert classroom.check_latent_shift(tiny, factor).right
    wrong = classroom.check_latent_shift(tiny, 1)
    assert wrong.right is False and f"{factor} image pixels" in wrong.message
    assert classroom.check_latent_shift(tiny, None).right is None


def test_scaling_factor_on_100_scenes(tiny):
    """02.3: 1 / std of 100 scenes' latents, computed here with numpy from the encoder's means."""
    import numpy as np

    from sdlens.world import render, sample_scene

    rng = np.random.default_rng(0)
    x = np.stack([render(sample_scene(rng), size=64, seed=i).image for i in range(100)])
    with torch.no_grad():
        z = tiny.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    truth = 1 / np.std(z.numpy().astype(np.float64), ddof=1)
    assert classroom.check_scaling_factor(tiny, round(truth, 3)).right
    assert classroom.check_scaling_factor(tiny, 2 * truth).right is False
    assert classroom.check_scaling_factor(tiny, None).right is None


def test_sd15_tflop_counts_the_guidance_batch_and_the_steps():
    """02.5: the truth against one FLOP count of a batch of 2 (guidance) on SD 1.5's UNet, times 50 steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlens.models.families import sd15_layout_unet

    with torch.device("meta"):
        unet = sd15_layout_unet(width=320)
        x, ctx = torch.zeros(2, 4, 64, 64), torch.zeros(2, 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, 500, encoder_hidden_states=ctx)
    latent_tflop = 50 * counter.get_total_flops() / 1e12
    latent, pixel = classroom.sd15_image_tflop()
    assert latent == pytest.approx(latent_tflop, rel=0.01)
    assert pixel > 64 * latent  # 64 times the positions, and attention grows with their square
    assert classroom.check_sd15_tflop(round(latent, 1), round(pixel)).right
    assert classroom.check_sd15_tflop(latent / 2, pixel).right is False  # forgot the guidance batch
    assert classroom.check_sd15_tflop(latent, None).right is None


def test_settling_steps_read_the_trajectory(tiny):
    """03.3: the steps from which x̂0's colours and positions stay, against x̂0 computed here from the
    UNet's own inputs and outputs (x̂0 = (x_t - √(1-ᾱ) ε̂) / √ᾱ, guidance applied by hand)."""
    from sdlens.world import score

    prompt = "a red circle on the left and a blue triangle on the right"
    assert tiny.scheduler.init_noise_sigma == 1  # a VP scheduler: the formula above holds
    x0s = []

    def grab(module, args, kwargs, output):
        x, t = args[0][:1], int(args[1])
        eps_uncond, eps_text = output[0].chunk(2)
        eps = eps_uncond + 7.5 * (eps_text - eps_uncond)
        abar = tiny.scheduler.alphas_cumprod[t]
        x0s.append((x - (1 - abar).sqrt() * eps) / abar.sqrt())

    handle = tiny.unet.register_forward_hook(grab, with_kwargs=True)
    try:
        tiny(prompt, num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    finally:
        handle.remove()
    with torch.no_grad():
        decoded = tiny.vae.decode(torch.cat(x0s) / tiny.vae.config.scaling_factor).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    colours = [tuple(o["detected"] and o["detected"].color for o in score(im, prompt)["objects"]) for im in images]
    by_hand = max([0] + [i + 1 for i, c in enumerate(colours) if c != colours[-1]])  # first step of the final colours
    s = classroom.settling_steps(tiny, prompt)
    assert s["color"] == by_hand
    assert classroom.check_settling(tiny, s["color"], s["position"], prompt).right
    assert classroom.check_settling(tiny, s["color"] + 5, s["position"], prompt).right is False
    assert classroom.check_settling(tiny, None, 1, prompt).right is None


def test_mix_norms_against_numpy(tiny):
    """03.4: norms of the straight mixes, computed here with numpy from the same seeds."""
    import numpy as np

    c, side = tiny.unet.config.in_channels, tiny.unet.config.sample_size
    a, b = (torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(s)).numpy().astype(np.float64)
            for s in (0, 100))
    alphas = (0.0, 0.1, 0.25, 0.5, 1.0)
    truth = [float(np.sqrt((((1 - t) * a + t * b) ** 2).sum())) for t in alphas]
    assert classroom.check_mix_norms(tiny, [round(n, 1) for n in truth]).right
    assert truth[3] < 0.8 * truth[0]  # the midpoint falls inside the sphere
    wrong = classroom.check_mix_norms(tiny, [truth[0]] * 5)  # "the norm stays": slerp's answer, not the straight mix's
    assert wrong.right is False and "√(d/2)" in wrong.message
    assert classroom.check_mix_norms(tiny, None).right is None
