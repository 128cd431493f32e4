"""The denoiser drawn from the loaded model itself: its blocks, their resolutions and widths, and
where the timestep, the text and attention enter.

``plan(pipe)`` reads the modules (not a table of known models), so the drawing is right for any
UNet or SD 3-style transformer diffusers builds: the built-in models, SD 1.5 or SDXL's configs.
``architecture(pipe)`` draws the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CaptureError
from ..hooks.layers import denoiser_of, latent_size_of


@dataclass
class Stage:
    """One box of the drawing: a UNet block (or the mid block), or a run of transformer blocks."""

    name: str  # diffusers' module path ("down_blocks.1") or a short name ("patch embedding")
    kind: str  # "down", "mid", "up" (UNet); "embed", "joint", "out" (transformer)
    size: tuple[int, int]  # the map (h, w) its layers see
    channels: int  # width of its output features
    resnets: int = 0
    transformers: int = 0  # transformer blocks (each: self-attention, cross-attention, feed-forward)
    heads: int = 0
    resample: str = ""  # "down", "up" or ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What ``architecture`` draws: the stages in order, and the inputs that enter every stage."""

    denoiser: str
    latent: tuple[int, int, int]  # (channels, h, w) the denoiser takes
    context: tuple[int, int]  # (slots, width) of the text input
    stages: list[Stage]
    inputs: list[str]  # what enters where, one sentence each

    @property
    def attention_layers(self) -> int:
        return sum(s.transformers for s in self.stages)


def _transformer_count(attentions) -> tuple[int, int]:
    """(transformer blocks, heads of their first attention) in a block's ``attentions`` list."""
    n, heads = 0, 0
    for t in attentions or []:
        blocks = getattr(t, "transformer_blocks", [])
        n += len(blocks)
        if blocks and not heads:
            heads = int(blocks[0].attn1.heads)
    return n, heads


def _unet_plan(unet, latent_hw: tuple[int, int], slots: int) -> Plan:
    h, w = latent_hw
    stages = []
    for i, block in enumerate(unet.down_blocks):
        n, heads = _transformer_count(getattr(block, "attentions", None))
        down = getattr(block, "downsamplers", None) is not None
        stages.append(Stage(f"down_blocks.{i}", "down", (h, w), block.resnets[-1].out_channels, len(block.resnets), n,
                            heads, "down" if down else ""))
        if down:
            h, w = -(-h // 2), -(-w // 2)  # a stride-2 convolution: ceil
    mid = unet.mid_block
    if mid is not None:
        n, heads = _transformer_count(getattr(mid, "attentions", None))
        stages.append(Stage("mid_block", "mid", (h, w), mid.resnets[-1].out_channels, len(mid.resnets), n, heads))
    sizes = [s.size for s in stages if s.kind == "down"]
    for i, block in enumerate(unet.up_blocks):
        n, heads = _transformer_count(getattr(block, "attentions", None))
        size = sizes[len(sizes) - 1 - i]
        up = getattr(block, "upsamplers", None) is not None
        stages.append(Stage(f"up_blocks.{i}", "up", size, block.resnets[-1].out_channels, len(block.resnets), n, heads,
                            "up" if up else ""))
    cfg = unet.config
    inputs = [
        "timestep → sinusoidal embedding → MLP → added to the features inside every ResNet block",
        f"text ({slots} slots × {cfg.cross_attention_dim}) → the keys and values of every cross-attention",
        "each transformer block: self-attention (pixel → pixel), cross-attention (pixel → text), feed-forward",
        "skip connections: each down block's outputs join the up block at the same size",
    ]
    return Plan(type(unet).__name__, (cfg.in_channels, *latent_hw), (slots, cfg.cross_attention_dim), stages, inputs)


def _transformer_plan(model, latent_hw: tuple[int, int], slots: int, t5: int) -> Plan:
    cfg = model.config
    p = cfg.patch_size
    grid = (latent_hw[0] // p, latent_hw[1] // p)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    dual = [i for i, b in enumerate(model.transformer_blocks) if getattr(b, "attn2", None) is not None]
    stages = [Stage("pos_embed", "embed", grid, width, notes=[f"{p}×{p} patches → {grid[0] * grid[1]} tokens",
                                                               "+ a fixed 2-D sine–cosine position embedding"])]
    n = len(model.transformer_blocks)
    stages.append(Stage(f"transformer_blocks.0–{n - 1}", "joint", grid, width, transformers=n,
                        heads=cfg.num_attention_heads,
                        notes=["joint attention over image and text tokens"]
                        + ([f"+ image-only attention in blocks {dual[0]}–{dual[-1]}"] if dual else [])))
    stages.append(Stage("proj_out", "out", latent_hw, cfg.out_channels, notes=["tokens → patches → the latent's velocity"]))
    pooled = model.time_text_embed.text_embedder.linear_1.weight
    conditioning = ("timestep + pooled text vector → one conditioning vector → scale, shift and gate of every "
                    "block (adaLN)")
    if not bool(pooled.detach().any()):  # tiny-sd3: the pooled vector's input weights are zero (read from the weights)
        conditioning = ("timestep → one conditioning vector → scale, shift and gate of every block (adaLN); "
                        "the pooled text vector's weights are zero: it carries nothing")
    inputs = [
        conditioning,
        f"text ({slots} CLIP slots" + (f" + {t5} T5 slots, zeros when there is no T5" if t5 else "")
        + f" × {cfg.joint_attention_dim}) → projected to {width} and run as tokens of their own",
        "each block: one attention over image and text tokens together, then each stream's feed-forward",
    ]
    return Plan(type(model).__name__, (cfg.in_channels, *latent_hw), (slots + t5, cfg.joint_attention_dim), stages,
                inputs)


def plan(pipe, height: int | None = None, width: int | None = None) -> Plan:
    """The denoiser of ``pipe`` (UNet or SD 3-style transformer) as a ``Plan``, at an image size
    (default: the model's own)."""
    denoiser = denoiser_of(pipe)
    latent_hw = latent_size_of(pipe, height, width)
    tokenizer = getattr(pipe, "tokenizer", None)
    slots = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
    if hasattr(denoiser, "down_blocks"):
        return _unet_plan(denoiser, latent_hw, slots)
    if hasattr(denoiser, "transformer_blocks") and hasattr(denoiser.config, "joint_attention_dim"):
        t5 = 256 if pipe is not denoiser and hasattr(pipe, "tokenizer_3") else 0  # SD 3 pipelines' default T5 length
        return _transformer_plan(denoiser, latent_hw, slots, t5)
    raise CaptureError(f"architecture draws UNets and SD 3-style transformers; got {type(denoiser).__name__}")


def _label(s: Stage) -> str:
    lines = [s.name, f"{s.size[0]}×{s.size[1]} · {s.channels} ch"]
    if s.kind in ("down", "mid", "up"):
        parts = [f"{s.resnets}× ResNet"] + ([f"{s.transformers}× transformer ({s.heads} heads)"] if s.transformers else [])
        lines.append(" + ".join(parts))
        if s.resample:
            lines.append(f"then {s.resample}sample ×2")
    else:
        if s.transformers:
            lines.append(f"{s.transformers}× joint block ({s.heads} heads)")
        lines += s.notes
    return "\n".join(lines)


def architecture(pipe, height: int | None = None, width: int | None = None):
    """Draw the denoiser of ``pipe`` from its modules: a UNet as a U (down blocks, mid block, up
    blocks with their skip connections), an SD 3-style transformer as a column; each box with its
    map size, width and layers (blocks with transformers are shaded), and what enters where.
    Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    p = plan(pipe, height, width)
    unet = p.stages[0].kind == "down"
    if unet:
        downs = [s for s in p.stages if s.kind == "down"]
        ups = [s for s in p.stages if s.kind == "up"]
        mids = [s for s in p.stages if s.kind == "mid"]
        depth = len(downs)
        pos = {}
        for i, s in enumerate(downs):
            pos[s.name] = (0.0, -i)
        for s in mids:
            pos[s.name] = (1.0, -depth)
        for i, s in enumerate(ups):
            pos[s.name] = (2.0, -(depth - 1 - i))
        fig_h = 1.2 * (depth + 1) + 1.6
        fig, ax = plt.subplots(figsize=(11, fig_h))
    else:
        pos = {s.name: (1.0, -i) for i, s in enumerate(p.stages)}
        fig, ax = plt.subplots(figsize=(9, 1.4 * len(p.stages) + 1.6))
    box_w, box_h = 0.86, 0.78
    for s in p.stages:
        x, y = pos[s.name]
        shaded = s.transformers > 0
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
                                    facecolor="#dcd8f0" if shaded else "#f2f2f2", edgecolor="0.35"))
        ax.text(x, y, _label(s), ha="center", va="center", fontsize=7.5)

    def arrow(a, b, style="-|>", color="0.25", ls="-", rad=0.0):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=color, linestyle=ls,
                                     connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))

    order = [s.name for s in p.stages]
    for a, b in zip(order, order[1:]):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        if unet and xa == xb:
            up = 1 if yb > ya else -1  # the up path climbs back
            arrow((xa, ya + up * box_h / 2), (xb, yb - up * box_h / 2))
        elif unet:
            arrow((xa + (box_w / 2 if xb > xa else 0), ya - (0 if xb > xa else box_h / 2)),
                  (xb - (box_w / 2 if xb > xa else 0), yb + (0 if xb > xa else box_h / 2)))
        else:
            arrow((xa, ya - box_h / 2), (xb, yb + box_h / 2))
    if unet:
        for i, d in enumerate(downs):
            u = ups[len(ups) - 1 - i]
            arrow((pos[d.name][0] + box_w / 2, pos[d.name][1] + 0.2), (pos[u.name][0] - box_w / 2, pos[u.name][1] + 0.2),
                  color="#5a57a6", ls="--")
        ax.set_xlim(-0.6, 2.6)
        ax.set_ylim(-depth - 0.6, 0.9)
        c, h, w = p.latent
        ax.text(0, 0.62, f"noisy latent ({c}×{h}×{w}) in", ha="center", fontsize=8)
        ax.text(2, 0.62, f"noise estimate ({c}×{h}×{w}) out", ha="center", fontsize=8)
    else:
        ax.set_xlim(-0.2, 2.6)
        ax.set_ylim(-len(p.stages) + 0.4, 0.9)
        c, h, w = p.latent
        ax.text(1, 0.62, f"noisy latent ({c}×{h}×{w}) and text ({p.context[0]}×{p.context[1]}) in", ha="center",
                fontsize=8)
    ax.axis("off")
    legend = "\n".join(f"• {line}" for line in p.inputs)
    fig.text(0.01, 0.01, legend, fontsize=7.5, va="bottom", ha="left")
    fig.suptitle(f"{p.denoiser}: {p.attention_layers} transformer blocks (shaded boxes hold them)", fontsize=10)
    fig.subplots_adjust(bottom=0.06 + 0.022 * len(p.inputs), top=0.93)
    return fig


__all__ = ["Plan", "Stage", "architecture", "plan"]
