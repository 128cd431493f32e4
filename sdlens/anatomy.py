"""Where the transformers are in a diffusion model: its attention layers, sizes, parameters and compute.

    >>> from sdlens.models.families import sd1
    >>> a = anatomy(sd1())
    >>> a.count("cross"), a.count("self")
    (7, 7)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .hooks.layers import attention_layers, denoiser_of, latent_size_of, token_packing, vae_factor


@dataclass(frozen=True)
class AttentionRow:
    """One attention layer: diffusers name, role, heads × head dim, query grid, parameters."""

    name: str
    role: str
    heads: int
    head_dim: int
    map_size: tuple[int, int] | None
    params: int


@dataclass
class Anatomy:
    """The anatomy of one pipeline's denoiser and text encoder(s)."""

    denoiser: str
    latent_size: tuple[int, int]
    image_size: tuple[int, int]
    layers: list[AttentionRow]
    params_total: int
    params_attention: int
    params_transformer_blocks: int
    flops_total: float | None = None
    flops_attention: float | None = None
    text_encoders: list[dict] = field(default_factory=list)

    def count(self, role: str) -> int:
        """Number of layers providing ``role`` maps (``"cross"`` or ``"self"``; joint layers give both)."""
        return sum(1 for r in self.layers if r.role == role or r.role == "joint")

    def __str__(self) -> str:
        lines = [
            f"denoiser: {self.denoiser}  latent {self.latent_size[0]}×{self.latent_size[1]} "
            f"→ image {self.image_size[0]}×{self.image_size[1]}",
            f"{'layer':<62} {'role':<6} {'heads':>5} {'dim':>4} {'map':>8} {'params':>10}",
        ]
        for r in self.layers:
            size = f"{r.map_size[0]}×{r.map_size[1]}" if r.map_size else "?"
            lines.append(f"{r.name:<62} {r.role:<6} {r.heads:>5} {r.head_dim:>4} {size:>8} {r.params:>10,}")
        joint = sum(r.role == "joint" for r in self.layers)
        if joint:  # one softmax over image and text keys: each joint layer gives both kinds of map
            rest = len(self.layers) - joint
            lines.append(f"{len(self.layers)} attention layers: {joint} joint (each gives an image→text and an "
                         f"image→image part)" + (f", {rest} image-only" if rest else ""))
        else:
            lines.append(f"{len(self.layers)} attention layers: {self.count('cross')} cross-attention, "
                         f"{self.count('self')} self-attention")
        lines.append(
            f"parameters: {self.params_total:,} in the denoiser; attention {self.params_attention:,} "
            f"({100 * self.params_attention / self.params_total:.1f}%), whole transformer blocks "
            f"{self.params_transformer_blocks:,} ({100 * self.params_transformer_blocks / self.params_total:.1f}%)"
        )
        if self.flops_total:
            lines.append(
                f"compute for one denoiser call: {_flops(self.flops_total)}, attention layers "
                f"{_flops(self.flops_attention)} ({100 * self.flops_attention / self.flops_total:.1f}%)"
            )
        for te in self.text_encoders:
            lines.append(
                f"text encoder {te['name']}: {te['class']}, {te['layers']} transformer layers × {te['heads']} heads, "
                f"width {te['width']}, "
                + (f"{te['positions']} positions" if te["positions"] else "relative positions (any length)")
                + f", {te['params']:,} parameters"
            )
        return "\n".join(lines)


def _flops(n: float) -> str:
    """A FLOP count in the unit that keeps two significant digits: 8.5 GFLOP, 62 MFLOP, 3.1 kFLOP."""
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(QKᵀ)V (torch's counter has no formula for the CPU flash-attention kernel)."""
    b, h, n, d = query_shape
    m, dv = key_shape[2], value_shape[3]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * dv


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dummy_inputs(pipe, denoiser, latent_hw):
    cfg = denoiser.config
    p = next(denoiser.parameters())
    sample = torch.zeros(1, cfg.in_channels, *latent_hw, device=p.device, dtype=p.dtype)
    t = torch.tensor([500.0], device=p.device)
    if hasattr(denoiser, "down_blocks"):
        ctx = torch.zeros(1, 77, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
        kw = {}
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            n_pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(1, n_pooled, device=p.device, dtype=p.dtype),
                "time_ids": torch.zeros(1, 6, device=p.device, dtype=p.dtype),
            }
        return dict(sample=sample, timestep=t, encoder_hidden_states=ctx, **kw)
    pooled = torch.zeros(1, cfg.pooled_projection_dim, device=p.device, dtype=p.dtype)
    packing = token_packing(denoiser)
    if packing > 1:  # Flux: 2×2 latent patches packed into tokens, with position ids; 512 T5 slots
        h, w = latent_hw[0] // packing, latent_hw[1] // packing
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(p.device, p.dtype)
        ctx = torch.zeros(1, 512, cfg.joint_attention_dim, device=p.device, dtype=p.dtype)
        kw = {"guidance": torch.tensor([3.5], device=p.device)} if cfg.guidance_embeds else {}
        return dict(hidden_states=torch.zeros(1, h * w, cfg.in_channels, device=p.device, dtype=p.dtype),
                    timestep=t / 1000, encoder_hidden_states=ctx, pooled_projections=pooled,
                    txt_ids=torch.zeros(512, 3, device=p.device, dtype=p.dtype), img_ids=img_ids, **kw)
    ctx = torch.zeros(1, 77, cfg.joint_attention_dim, device=p.device, dtype=p.dtype)
    return dict(hidden_states=sample, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)


def anatomy(pipe, height: int | None = None, width: int | None = None, *, flops: bool = True) -> Anatomy:
    """Describe the attention layers of ``pipe`` at an image size (default: the model's own).

    With ``flops=True`` one denoiser call is run on zeros under torch's FLOP counter to measure what
    share of the compute the attention layers take.
    """
    denoiser = denoiser_of(pipe)
    latent_hw = latent_size_of(pipe, height, width)
    modules = dict(denoiser.named_modules())
    rows = []
    for info in attention_layers(denoiser):
        m = modules[info.name]
        head_dim = m.to_q.out_features // m.heads
        size = info.map_size(latent_hw) if info.factor is not None else None
        rows.append(AttentionRow(info.name, info.role, info.heads, head_dim, size, _n(m)))
    blocks = {name: mod for name, mod in modules.items() if type(mod).__name__.endswith("TransformerBlock")}
    a = Anatomy(
        denoiser=type(denoiser).__name__,
        latent_size=latent_hw,
        image_size=(latent_hw[0] * vae_factor(pipe), latent_hw[1] * vae_factor(pipe)),
        layers=rows,
        params_total=_n(denoiser),
        params_attention=sum(r.params for r in rows),
        params_transformer_blocks=sum(_n(b) for b in blocks.values()),
    )
    if flops:
        extra = {}
        if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            extra[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        counter = FlopCounterMode(display=False, custom_mapping=extra)
        with torch.no_grad(), counter:
            denoiser(**_dummy_inputs(pipe, denoiser, latent_hw))
        by_module = counter.get_flop_counts()
        total = sum(counter.get_flop_counts().get("Global", {}).values())
        root = type(denoiser).__name__
        attn = 0
        for r in rows:  # FlopCounterMode names modules by their path under the root's class name
            attn += sum(by_module.get(f"{root}.{r.name}", {}).values())
        a.flops_total, a.flops_attention = float(total), float(attn)
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        te = getattr(pipe, attr, None)
        if te is None:
            continue
        c = te.config
        a.text_encoders.append({
            "name": attr,
            "class": type(te).__name__,
            "layers": getattr(c, "num_hidden_layers", getattr(c, "num_layers", None)),
            "heads": getattr(c, "num_attention_heads", getattr(c, "num_heads", None)),
            "width": getattr(c, "hidden_size", getattr(c, "d_model", None)),
            "positions": getattr(c, "max_position_embeddings", None),
            "params": _n(te),
        })
    return a
