"""Checks and hints for the notebooks' exercises.

A check takes the student's answer and says whether it is right and why, from the true answer
computed here from the model, the tokenizer or the trace (never a stored number). An unanswered
check (``None``) says what to write. Open exercises have hints (``hint("04.2")``).

    >>> from sdlens import classroom
    >>> classroom.check_slots("a red circle", 5).right
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    """The outcome of a check: ``right`` (None when there was no answer) and the explanation."""

    right: bool | None
    message: str

    def __repr__(self) -> str:
        mark = {True: "✓ right", False: "✗ not yet", None: "… no answer yet"}[self.right]
        return f"{mark}: {self.message}"


def _verdict(answer, truth, why: str, close=None) -> Verdict:
    if answer is None:
        return Verdict(None, "put your answer in the variable above and run this cell again")
    ok = close(answer, truth) if close else answer == truth
    return Verdict(bool(ok), why if ok else f"you said {answer!r}; {why}")


def check_slots(text: str, answer: int | None, tokenizer=None) -> Verdict:
    """Exercise 04.1: how many of the 77 slots ``text`` fills (start and end tokens included)."""
    from .tokens import tokenize

    t = tokenize(text, tokenizer)
    n = t.n_real
    cut = f" (it is cut: only its first {len(t.words)} words reach the model)" if t.truncated else ""
    return _verdict(answer, n, f"{text[:40]!r} fills {n} slots: start, {n - 2} token(s), end{cut}")


def check_guidance_batch(pipe, answer: int | None) -> Verdict:
    """Exercise 01.4: the batch the denoiser sees at each step with ``guidance_scale=1.0``."""
    from .hooks.layers import denoiser_of

    seen = []
    handle = denoiser_of(pipe).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(int((args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0])),
        with_kwargs=True)
    try:
        pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return _verdict(answer, seen[0], f"with guidance 1 the pipeline skips the empty-prompt half: the denoiser sees "
                                     f"a batch of {seen[0]} (guidance above 1 doubles it)")


def softmax_entropy(scores: torch.Tensor) -> float:
    """Mean entropy (nats) of the softmax of ``scores`` over the last dimension."""
    p = scores.float().softmax(-1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def cross_attention_qk(pipe, prompt: str = "a red circle on the left", seed: int = 0):
    """Per-head queries ``(heads, n, d)`` and keys ``(heads, 77, d)`` of the first cross-attention layer
    of a UNet pipeline, for ``prompt`` on a noisy latent halfway through the noise (one denoiser call)."""
    from .hooks.layers import attention_layers, denoiser_of

    unet = denoiser_of(pipe)
    name = next(i.name for i in attention_layers(unet) if i.role == "cross")
    attn = dict(unet.named_modules())[name]
    grabbed = {}
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.update(x=args[0] if args else kwargs["hidden_states"],
                                               ctx=kwargs.get("encoder_hidden_states")), with_kwargs=True)
    try:
        with torch.no_grad():
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids.to(pipe.device)
            context = pipe.text_encoder(ids)[0]
            c, size = unet.config.in_channels, unet.config.sample_size
            latent = torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(seed)).to(pipe.device, context.dtype)
            unet(latent, 500, encoder_hidden_states=context)
            heads = attn.heads
            q = attn.to_q(grabbed["x"])[0]
            k = attn.to_k(grabbed["ctx"])[0]
    finally:
        handle.remove()
    return (q.unflatten(-1, (heads, -1)).transpose(0, 1), k.unflatten(-1, (heads, -1)).transpose(0, 1))


def check_scale(pipe, answer: str | None) -> Verdict:
    """Exercise 04.3: with the scale 1 instead of 1/√d, is the UNet's cross-attention "sharper" or
    "flatter"? Measured on its first cross-attention layer (``cross_attention_qk``)."""
    q, k = cross_attention_qk(pipe)
    d = q.shape[-1]
    scores = q.float() @ k.float().transpose(-1, -2)
    h_scaled, h_one = softmax_entropy(scores * d**-0.5), softmax_entropy(scores)
    truth = "sharper" if h_one < h_scaled else "flatter"
    return _verdict(None if answer is None else str(answer).strip().lower(), truth,
                    f"the scores grow √d = {d ** 0.5:.1f} times larger, so the softmax is {truth}: mean entropy "
                    f"{h_one:.2f} nats against {h_scaled:.2f} with 1/√d (less entropy: the weight sits on fewer "
                    "slots); the scale keeps the scores' spread the same whatever the head's width")


def joint_tokens(pipe, height: int | None = None, width: int | None = None, t5_slots: int = 256) -> int:
    """Tokens one joint-attention block of an SD 3 pipeline attends over at an image size: image
    patches plus the CLIP slots plus T5's."""
    from .hooks.layers import latent_size_of

    patch = pipe.transformer.config.patch_size
    h, w = latent_size_of(pipe, height, width)
    return (h // patch) * (w // patch) + pipe.tokenizer.model_max_length + t5_slots


def check_joint_tokens(pipe, tiny_answer: int | None, sd3_answer: int | None, matrix_answer: int | None) -> Verdict:
    """Exercise 04.6: tokens per block of tiny-sd3; of SD 3 at 1024 px (latent 128, patch 2, 77 + 256
    text tokens); entries of one joint-attention matrix per head of SD 3 there."""
    tiny = joint_tokens(pipe)
    sd3 = (128 // 2) ** 2 + 77 + 256
    truth = (tiny, sd3, sd3 * sd3)
    given = (tiny_answer, sd3_answer, matrix_answer)
    if any(a is None for a in given):
        return Verdict(None, "give all three numbers, then run this cell again")
    why = (f"tiny-sd3: {tiny} tokens ({tiny - pipe.tokenizer.model_max_length - 256} image patches + "
           f"{pipe.tokenizer.model_max_length} CLIP slots + 256 T5 slots); SD 3 at 1024 px: 64 × 64 = 4096 patches "
           f"+ 333 text tokens = {sd3}; one matrix per head: {sd3}² = {sd3 * sd3:,} entries")
    return _verdict(tuple(int(a) for a in given), truth, why)


# --- notebook 2: the latent space -----------------------------------------------------------------


def _image_side(pipe) -> int:
    from .hooks.layers import denoiser_of

    return denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def _encode_mean(pipe, images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) → the mean of the VAE encoder's distribution, unscaled (N, C, h, w)."""
    import numpy as np

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.cat([pipe.vae.encode(chunk.to(pipe.device, pipe.vae.dtype)).latent_dist.mean.float()
                      for chunk in x.split(16)])


@torch.no_grad()
def _decode_float(pipe, latents: torch.Tensor):
    """Unscaled latents (N, C, h, w) → float images (N, H, W, 3) in 0..255 (numpy)."""
    x = pipe.vae.decode(latents.to(pipe.device, pipe.vae.dtype)).sample.float().clamp(-1, 1)
    return ((x + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()


def latent_shift(pipe, caption: str = "a red circle on the left", seed: int = 0) -> int:
    """How many image pixels a picture moves when its latent is rolled one latent pixel to the right.

    Encodes a rendered scene, rolls the latent (``torch.roll``) by one along the width, decodes, and
    returns the roll of the unshifted decoding (0 … 2·``vae_scale_factor`` pixels) that matches it best.
    """
    import numpy as np

    from .world import parse_caption, render

    image = render(parse_caption(caption), size=_image_side(pipe), seed=seed).image
    z = _encode_mean(pipe, [image])
    base, moved = _decode_float(pipe, torch.cat([z, torch.roll(z, 1, dims=-1)]))
    errors = [np.abs(moved - np.roll(base, k, axis=1)).mean() for k in range(2 * pipe.vae_scale_factor + 1)]
    return int(np.argmin(errors))


def check_latent_shift(pipe, answer: int | None) -> Verdict:
    """Exercise 02.2: image pixels the picture moves when its latent moves one latent pixel
    (measured with ``latent_shift``, not read from the config)."""
    if answer is None:
        return _verdict(None, None, "")
    shift, f = latent_shift(pipe), pipe.vae_scale_factor
    same = "the same as" if shift == f else "not"
    return _verdict(answer, shift, f"the decoded picture moves {shift} image pixels per latent pixel, {same} "
                                   f"vae_scale_factor = {f}: each latent pixel describes the {f}×{f} patch of "
                                   "the image above it, and the decoder, being convolutional, moves the "
                                   "picture with its latent")


def scaling_factor_of(pipe, n: int = 100, seed: int = 0) -> float:
    """1 / std of the raw (unscaled) latents of ``n`` random shapes-world scenes, drawn as notebook 2's
    section 1 draws its twelve (``sample_scene`` with ``numpy.random.default_rng(seed)``, scene ``i``
    rendered with seed ``i``)."""
    import numpy as np

    from .world import render, sample_scene

    rng = np.random.default_rng(seed)
    side = _image_side(pipe)
    images = [render(sample_scene(rng), size=side, seed=i).image for i in range(n)]
    return 1 / float(_encode_mean(pipe, images).std())


def check_scaling_factor(pipe, answer: float | None, n: int = 100, rtol: float = 0.03) -> Verdict:
    """Exercise 02.3: the scaling factor measured on ``n`` scenes (within ``rtol``, 3%: a different
    draw of scenes moves it by about that much)."""
    if answer is None:
        return _verdict(None, None, "")
    measured, twelve = scaling_factor_of(pipe, n), scaling_factor_of(pipe, 12)
    config = pipe.vae.config.scaling_factor
    return _verdict(float(answer), measured,
                    f"1 / std over {n} scenes is {measured:.4f} (over section 1's 12: {twelve:.4f}; the pipeline's "
                    f"scaling_factor: {config:.4f}, {abs(measured / config - 1):.1%} away)",
                    close=lambda a, t: abs(a - t) <= rtol * abs(t))


def sd15_image_tflop(steps: int = 50) -> tuple[float, float]:
    """TFLOP of one SD 1.5 picture at 512 px with classifier-free guidance (a batch of 2 per step) over
    ``steps`` steps: ``(latent space, pixel space)``, from the FLOP count of one UNet call on the
    64×64 latent and on the 512×512 pixel grid (`sdlens.anatomy` on the meta device)."""
    import types

    from .anatomy import anatomy
    from .models.families import sd15_layout_unet

    with torch.device("meta"):
        unet = sd15_layout_unet(width=320)
    per_call = [anatomy(types.SimpleNamespace(unet=unet, vae_scale_factor=1), height=side, width=side).flops_total
                for side in (64, 512)]
    return tuple(2 * steps * flops / 1e12 for flops in per_call)


def check_sd15_tflop(latent_answer: float | None, pixel_answer: float | None, steps: int = 50,
                     rtol: float = 0.02) -> Verdict:
    """Exercise 02.5: TFLOP of one 512 px SD 1.5 picture in latent space and in pixel space (50 steps,
    guidance doubling the batch), within ``rtol`` (2%, for rounding)."""
    if latent_answer is None or pixel_answer is None:
        return _verdict(None, None, "")
    latent, pixel = sd15_image_tflop(steps)
    why = (f"one UNet call costs {latent * 1e3 / (2 * steps):,.0f} GFLOP on the 64×64 latent and "
           f"{pixel * 1e3 / (2 * steps):,.0f} GFLOP on 512×512 pixels; × 2 for the guidance batch × {steps} steps "
           f"= {latent:,.1f} TFLOP in latent space, {pixel:,.0f} TFLOP in pixel space ({pixel / latent:,.0f}×)")
    return _verdict((float(latent_answer), float(pixel_answer)), (latent, pixel), why,
                    close=lambda a, t: all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, t)))


# --- notebook 3: diffusion ------------------------------------------------------------------------


def settling_steps(pipe, prompt: str, seed: int = 0, steps: int = 20, guidance: float = 7.5) -> dict[str, int]:
    """From which step on the predicted clean picture x̂0 keeps its final colours, positions and shapes.

    Runs ``pipe`` with ``record_latents=True``, reads each step's decoded x̂0 with
    `sdlens.world.score` (the detection matched to each caption object) and returns, per property,
    the first step (0 = the first step) after which it no longer changes.
    """
    from .capture.tracing import trace
    from .world import score

    with trace(pipe, cross=False, record_latents=True) as tr:
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    found = [[o["detected"] for o in score(image, prompt)["objects"]] for image in tr.x0_images[:, 0]]
    settled = {}
    for prop in ("color", "position", "shape"):
        seen = [tuple(getattr(d, prop, None) for d in objects) for objects in found]
        settled[prop] = next(i for i in range(len(seen)) if all(s == seen[-1] for s in seen[i:]))
    return settled


def check_settling(pipe, colour_step: int | None, position_step: int | None, prompt: str, seed: int = 0,
                   steps: int = 20) -> Verdict:
    """Exercise 03.3: the first step from which x̂0's colours, then its positions, stay as they end
    (``settling_steps``; steps counted from 0, as notebook 3's section 4 does)."""
    if colour_step is None or position_step is None:
        return _verdict(None, None, "")
    s = settling_steps(pipe, prompt, seed, steps)
    why = (f"x̂0's colours stay as they end from step {s['color']}, its positions from step {s['position']}, its "
           f"shapes from step {s['shape']} (of {steps}, counted from 0; seed {seed})")
    return _verdict((int(colour_step), int(position_step)), (s["color"], s["position"]), why)


def _lesson_noise(pipe, seed: int) -> torch.Tensor:
    """Notebook 3's ``noise(seed)``: the starting noise (1, C, s, s), drawn on the CPU."""
    from .hooks.layers import denoiser_of

    config = denoiser_of(pipe).config
    shape = (1, config.in_channels, config.sample_size, config.sample_size)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=denoiser_of(pipe).dtype)


def mix_norms(pipe, alphas=(0.0, 0.1, 0.25, 0.5, 1.0), seeds: tuple[int, int] = (0, 100)) -> list[float]:
    """Norms of the straight-line mixes ``(1 - a) · noise(seeds[0]) + a · noise(seeds[1])`` of notebook 3."""
    base, var = (_lesson_noise(pipe, s) for s in seeds)
    return [float(((1 - a) * base + a * var).float().norm()) for a in alphas]


def check_mix_norms(pipe, answer, alphas=(0.0, 0.1, 0.25, 0.5, 1.0), seeds: tuple[int, int] = (0, 100),
                    rtol: float = 0.02) -> Verdict:
    """Exercise 03.4: the norm of each straight-line mix of the variation strip, one per ``alphas``
    (within ``rtol``, 2%)."""
    if answer is None:
        return _verdict(None, None, "")
    truth = mix_norms(pipe, alphas, seeds)
    d = _lesson_noise(pipe, seeds[0]).numel()
    why = (f"the straight mixes at a = {', '.join(f'{a:g}' for a in alphas)} have norms "
           f"{', '.join(f'{n:.1f}' for n in truth)}: the two ends sit near √d = {d ** 0.5:.1f}, the midpoint near "
           f"√(d/2) = {(d / 2) ** 0.5:.1f}, a noise with too little variance (slerp keeps the norm)")
    return _verdict([float(a) for a in answer], truth, why,
                    close=lambda a, t: len(a) == len(t) and all(abs(x - y) <= rtol * y for x, y in zip(a, t)))


HINTS = {
    "01.1": "Compare the circle's position in the picture with the bright region of the map, seed by seed.",
    "01.2": "Run sdlens.world.score on each picture: it says which part of the caption (colour, shape, "
            "position, count) the model got wrong.",
    "01.3": "Step through the explorer and note the first step where the circle's map has one bright blob; "
            "then find the first x0 picture where a circle is recognisable.",
    "01.5": "Pick <pad> in the explorer's word menu and compare its map with the picture: objects or background?",
    "01.6": "Count how many of the 20 circles land in each quarter of the picture (analyze gives the centroid).",
    "02.1": "Decode the scaled latent and run sdlens.world.analyze on both pictures; the decoder is not linear, "
            "so compare what changes with what 1.5 × the pixels would do.",
    "02.2": "Roll by one latent pixel, decode, and find the shift that best matches the two pictures "
            "(try torch.roll on the decoded picture by 1…8 pixels).",
    "02.3": "Repeat section 3's measurement with 100 scenes and compare; in notebook 3, pass latents scaled by 2 "
            "or 0.5 to the sampling loop and look at the picture.",
    "02.4": "Compare the dot's pixels before and after the round trip (mean difference inside it).",
    "02.5": "Take section 7's GFLOP per UNet call, double it for the guidance batch, multiply by 50 steps; do the "
            "same for the pixel-space figure.",
    "03.1": "guidance = 1 means eps = eps_text exactly; for a negative scale, read what sdlens.world.score says "
            "the picture shows.",
    "03.2": "Measure each run's distance to a 50-step reference, as section 5 does, at 5, 10 and 20 steps.",
    "03.3": "Decode x̂0 at each step, run sdlens.world.analyze, and note the first step after which the "
            "colour (then the position) no longer changes.",
    "03.4": "Print torch.linalg.norm of each mixed noise: the straight mix is shorter in the middle.",
    "03.5": "Noise the start latent to the first kept timestep with scheduler.add_noise, then run "
            "scheduler.timesteps[-n_run:].",
    "03.6": "Compare the inpainted pictures of a few seeds: does anything outside the mask change?",
    "03.7": "Score each picture for 'a red circle on the left' with sdlens.world.score: how often is it a circle?",
    "06.1": "Read the self-attention map's values on the object and on the background at the edge pixel.",
    "06.2": "Re-run section 3's clustering cell with each K and compare the printed IoU.",
    "06.3": "Compare the similarity matrices: the clearer layout is the one whose same-layout block stands out.",
    "06.4": "Use until=3 in the swap and run sdlens.world.analyze on B's picture: where is its object?",
    "06.5": "Scale only the position word's slot in the probabilities (a Controller with probs, as in the hooks' "
            "docs) and compare the picture with B's.",
    "08.1": "Read the loss at the end and the printed match rate and IoU of both runs side by side.",
    "08.2": "Compare the loss curves at the same step counts, then the samples.",
    "08.3": "With no empty captions in training, the unconditional prediction was never learnt: look at the "
            "guided picture.",
    "08.4": "Run the section 6 lens on the new model and read the padding's share.",
    "08.5": "The command prints where it writes; load the folder and run notebook 1 on it.",
    "04.2": "Drop the mask by passing no causal mask to the attention; compare the vectors with torch.dist. "
            "Without the mask the start slot sees the whole prompt.",
    "04.4": "The anatomy table lists each attn2 with its map size; repeat section 3 with one of another size.",
    "04.5": "Move the query pixel with its (y, x) coordinates; the slot distribution is the bar chart.",
    "04.7": "A softmax over the concepts makes their maps sum to 1 at every pixel: where must the circle's share go "
            "when 'background' is missing?",
    "05.1": "'absolute' puts 0 at the dark end of one scale for all; 'each' stretches every panel to its own range.",
    "05.2": "Re-run the cell that computes IoU with the new threshold and compare the order of the layers.",
    "05.3": "score_maps takes steps=; compare its mean IoU with the all-steps value printed in section 3.",
    "05.4": "Sort the layers by their padding share and by their IoU; are the orders alike?",
    "05.5": "Read the unknown word's share in the word grid and where its map is bright.",
    "07.1": "Try starts 0.0, 0.2, 0.4, …; sdlens.world.analyze says where the object ends up.",
    "07.2": "Compare the edited picture's colour and shape (analyze) for windows 0.3 and 1.0.",
    "07.3": "Low thresholds grow the mask into the background; high ones shrink it inside the object.",
    "07.4": "Look at the colour of the circle and at how much of the picture changes (edit.change_map).",
    "07.5": "The reconstruction error is printed by the inversion cell; compare it with the right caption's.",
    "07.6": "Run the same cells with inversion='null-text' and compare the printed errors and IoU.",
}


def hint(exercise: str) -> str:
    """The hint for an exercise (``"04.2"``: notebook 4, exercise 2)."""
    if exercise not in HINTS:
        raise KeyError(f"no hint for {exercise!r}; exercises with hints: {', '.join(sorted(HINTS))}")
    return HINTS[exercise]


__all__ = [
    "HINTS",
    "Verdict",
    "check_guidance_batch",
    "check_joint_tokens",
    "check_latent_shift",
    "check_mix_norms",
    "check_scale",
    "check_scaling_factor",
    "check_sd15_tflop",
    "check_settling",
    "check_slots",
    "cross_attention_qk",
    "hint",
    "joint_tokens",
    "latent_shift",
    "mix_norms",
    "scaling_factor_of",
    "sd15_image_tflop",
    "settling_steps",
    "softmax_entropy",
]
