"""The `sdlens` command. One small function per subcommand: `add_<name>(subparsers)` declares its
options, `run_<name>(args)` does the work; `main` wires them.

    sdlens train-tiny --out runs/tiny                  train the built-in model (GPU if present)
    sdlens train-tiny --out runs/vae --stages vae      only a VAE, to share between UNet runs
    sdlens train-tiny --out runs/a --vae-from runs/vae --text-layers 0 --unet-minutes 5
"""

from __future__ import annotations

import argparse
import sys


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


class OldOption(argparse.Action):
    """An option's old spelling, kept for one release and left out of ``--help``: it sets the new
    option's value and says on stderr that the new spelling replaces it."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from sdlens.vocabulary import REMOVED_IN

        print(f"sdlens: {option_string} is now {self.new} ({option_string} stops working in sdlens {REMOVED_IN})",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_old_option(p, old: str, new: str, **kwargs) -> None:
    """Accept ``old`` (hidden) for the option ``new`` (same ``type``/``nargs`` in ``kwargs``)."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, action=OldOption, new=new, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                   **kwargs)


def refused(command: str, error: Exception) -> int:
    """Say why ``sdlens COMMAND`` refused its arguments, on one line of stderr; the exit status (2)."""
    print(f"sdlens {command}: error: {str(error).splitlines()[0]}", file=sys.stderr)
    return 2


def add_generation_options(p, *, seed: bool = True, size: bool = True, device: bool = True) -> None:
    """The options of every command that generates: model, seed, step count, guidance scale, size, device,
    progress bar (named as the Python keywords: ``--num-inference-steps`` is ``num_inference_steps``)."""
    p.add_argument("--model", default="tiny", help="'tiny' (the built-in UNet model, default), 'tiny-sd3' (the built-in "
                   "SD 3-style transformer), a pipeline folder or a hub id")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-inference-steps", type=int, default=25, metavar="N", help="denoising steps (default 25)")
    add_old_option(p, "--steps", "--num-inference-steps", type=int)
    p.add_argument("--guidance-scale", type=float, default=7.5, metavar="W",
                   help="classifier-free guidance scale (default 7.5; 1 turns guidance off)")
    add_old_option(p, "--guidance", "--guidance-scale", type=float)
    if size:
        p.add_argument("--size", default=None, help="image size: 64 or HEIGHTxWIDTH (default: the model's own)")
    if device:
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- train-tiny ------------------------------------------------------------------------------


def add_train_tiny(subparsers) -> None:
    from sdlens.models.configs import TEXT_MODES, TinyConfig
    from sdlens.models.mmdit import Sd3Config
    from sdlens.models.train import DEFAULT_BUDGETS, PRECISIONS, STAGES

    sd3_budget = _sd3_budget()
    d, s = TinyConfig(), Sd3Config()
    p = subparsers.add_parser(
        "train-tiny",
        help="train the built-in tiny Stable Diffusion on the shapes world",
        description="Train the tiny model (VAE, UNet, CLIP text encoder) on the shapes world and write a "
        "StableDiffusionPipeline folder (float16 safetensors) that sdlens.load_pipeline(OUT) loads. "
        "Runs on CUDA when present (bf16 autocast), else on the CPU.",
    )
    p.add_argument("--out", required=True, help="output folder (the pipeline, training.json, train/)")
    p.add_argument("--arch", choices=("unet", "sd3"), default="unet",
                   help="unet: the SD 1.x-style model (tiny); sd3: the SD 3-style pure transformer (tiny-sd3), "
                   "trained with flow matching on the built-in VAE and frozen text encoders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on the CPU; bf16 also on a CPU with AMX")
    p.add_argument(
        "--stages",
        type=lambda s: tuple(s.split(",")),
        default=None,
        help=f"comma-separated subset of {','.join(STAGES)} (default: those the config needs)",
    )
    p.add_argument(
        "--vae-from",
        default=None,
        metavar="DIR",
        help="reuse the trained VAE of another run (its --out folder) instead of training one",
    )
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start the UNet and text encoder from the weights of an exported run (fresh optimiser)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-every", type=int, default=50, help="loss-log interval in steps")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint interval")
    p.add_argument(
        "--keep-unused-tokens",
        action="store_true",
        help="export the token-embedding rows that no world caption uses (default: zeroed)",
    )

    g = p.add_argument_group("budgets (a stage stops at its steps or minutes, whichever comes first)")
    for stage in STAGES:
        b = DEFAULT_BUDGETS[stage]
        g.add_argument(f"--{stage}-steps", type=int, default=None, help=f"default {b.steps}")
        g.add_argument(f"--{stage}-minutes", type=float, default=None, help=f"default {b.minutes}")
        g.add_argument(f"--{stage}-batch", type=int, default=None, help=f"default {b.batch_size}")
        g.add_argument(f"--{stage}-lr", type=float, default=None, help=f"default {b.lr}")
    b = sd3_budget
    g.add_argument("--transformer-steps", type=int, default=None, help="--arch sd3: default none")
    g.add_argument("--transformer-minutes", type=float, default=None, help=f"--arch sd3: default {b.minutes}")
    g.add_argument("--transformer-batch", type=int, default=None, help=f"--arch sd3: default {b.batch_size}")
    g.add_argument("--transformer-lr", type=float, default=None, help=f"--arch sd3: default {b.lr}")

    m = p.add_argument_group("model (the variant knobs of TinyConfig)")
    m.add_argument(
        "--text-mode",
        choices=sorted(TEXT_MODES),
        default=d.text_mode,
        help="; ".join(f"{k}: {v}" for k, v in TEXT_MODES.items()),
    )
    m.add_argument("--text-width", type=int, default=d.text_width)
    m.add_argument("--text-layers", type=int, default=d.text_layers, help="0: embeddings + LayerNorm only")
    m.add_argument("--text-heads", type=int, default=d.text_heads)
    m.add_argument("--unet-channels", type=_int_tuple, default=d.unet_channels, help="e.g. 64,128,128")
    m.add_argument("--unet-layers-per-block", type=int, default=d.unet_layers_per_block)
    m.add_argument("--unet-head-dim", type=int, default=d.unet_head_dim, help="channels per attention head")
    m.add_argument("--vae-channels", type=_int_tuple, default=d.vae_channels)
    m.add_argument("--caption-dropout", type=float, default=None)
    m.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="min-SNR weighting; 0 turns it off")
    m.add_argument("--two-object-prob", type=float, default=None,
                   help=f"share of training scenes with two objects (the rest have one); default {d.two_object_prob}, "
                   f"--arch sd3 {s.two_object_prob}")
    m.add_argument("--free-position-prob", type=float, default=None,
                   help=f"share of training captions that give no positions (the objects go anywhere); default "
                   f"{d.free_position_prob}, --arch sd3 {s.free_position_prob}")
    m.add_argument("--size-word-prob", type=float, default=None,
                   help=f"each object's chance of a size word (small or big) in a training caption; default "
                   f"{d.size_word_prob}, --arch sd3 {s.size_word_prob}")
    m.add_argument("--word-dropout", type=float, default=d.word_dropout,
                   help="each word slot's chance of being zeroed in the UNet's input while training")
    m.add_argument("--sd3-layers", type=int, default=s.layers, help="--arch sd3: transformer blocks")
    m.add_argument("--sd3-heads", type=int, default=s.heads, help="--arch sd3: heads of 32 channels")
    m.add_argument("--pooled-dropout", type=float, default=s.pooled_dropout,
                   help="--arch sd3: each caption's chance that its pooled vector is the empty prompt's (the words "
                   "must then reach the picture through the joint attention)")
    m.add_argument("--pooled-input", action=argparse.BooleanOptionalAction, default=s.pooled_input,
                   help="--arch sd3: with --no-pooled-input (the default, the shipped model's) the pooled vector "
                   "reaches nothing (its projection's input weights zeroed and frozen), so the prompt is read "
                   "through the joint attention only; --pooled-input gives it SD 3's adaLN path too")
    m.add_argument("--color-word-dropout", type=float, default=s.color_word_dropout,
                   help="--arch sd3: each colour word's chance that its slot reaches the transformer zeroed while "
                   "training (the colour must then be read from the noun's slot, where a context layer put it)")
    m.add_argument("--text-context-layers", type=int, default=s.text_context_layers,
                   help="--arch sd3: causal text-encoder layers before the slots the transformer reads, trained "
                   "with it (0: each slot holds its own word)")
    m.add_argument("--tail-dropout", type=float, default=d.tail_dropout,
                   help="each training caption's chance that its slots after a random word are zeroed")
    p.set_defaults(func=run_train_tiny)


def run_train_tiny(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sdlens.models.configs import TinyConfig
    from sdlens.models.train import DEFAULT_BUDGETS, STAGES, train_tiny

    if args.arch == "sd3":
        return run_train_tiny_sd3(args)
    _fill_data_defaults(args, TinyConfig())

    try:  # bad values: one line naming the option, nothing written
        cfg = TinyConfig(
            text_mode=args.text_mode,
            text_width=args.text_width,
            text_layers=args.text_layers,
            text_heads=args.text_heads,
            unet_channels=args.unet_channels,
            unet_layers_per_block=args.unet_layers_per_block,
            unet_head_dim=args.unet_head_dim,
            vae_channels=args.vae_channels,
            caption_dropout=args.caption_dropout,
            snr_gamma=args.snr_gamma or None,
            two_object_prob=args.two_object_prob,
            free_position_prob=args.free_position_prob,
            size_word_prob=args.size_word_prob,
            word_dropout=args.word_dropout,
            tail_dropout=args.tail_dropout,
        )
        budgets = {}
        for stage in STAGES:
            b = DEFAULT_BUDGETS[stage]
            steps, minutes = getattr(args, f"{stage}_steps"), getattr(args, f"{stage}_minutes")
            if steps is not None or minutes is not None:  # given limits replace both defaults
                b = replace(b, steps=steps, minutes=minutes)
            batch, lr = getattr(args, f"{stage}_batch"), getattr(args, f"{stage}_lr")
            try:  # "is None", not "or": --unet-lr 0 means 0
                budgets[stage] = replace(
                    b, batch_size=b.batch_size if batch is None else batch, lr=b.lr if lr is None else lr
                )
            except ValueError as e:  # say which stage's options
                raise ValueError(f"--{stage}-batch / --{stage}-lr: {e}") from None
    except ValueError as e:
        return refused("train-tiny", e)
    out = train_tiny(
        args.out,
        cfg,
        budgets=budgets,
        stages=args.stages,
        vae_from=args.vae_from,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        progress=not args.no_progress,
        log_every=args.log_every,
        checkpoint_minutes=args.checkpoint_minutes,
        zero_unused_tokens=not args.keep_unused_tokens,
        command=["sdlens", *sys.argv[1:]],
        init_from=args.init_from,
        precision=args.precision,
    )
    print(out)
    return 0


def _fill_data_defaults(args: argparse.Namespace, cfg) -> None:
    """The training-data options left out take the chosen architecture's defaults."""
    for name in ("caption_dropout", "two_object_prob", "free_position_prob", "size_word_prob"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(cfg, name))


def _sd3_budget():
    from sdlens.models.mmdit import default_budget

    return default_budget()


def run_train_tiny_sd3(args: argparse.Namespace) -> int:
    """`train-tiny --arch sd3`: the transformer stage of tiny-sd3 (the VAE is reused; of the text encoders
    only the context layers, if any, train)."""
    from dataclasses import replace

    from sdlens.models.mmdit import Sd3Config, train_tiny_sd3

    _fill_data_defaults(args, Sd3Config())
    try:
        cfg = Sd3Config(
            caption_dropout=args.caption_dropout,
            two_object_prob=args.two_object_prob,
            free_position_prob=args.free_position_prob,
            size_word_prob=args.size_word_prob,
            layers=args.sd3_layers,
            heads=args.sd3_heads,
            pooled_dropout=args.pooled_dropout,
            pooled_input=args.pooled_input,
            color_word_dropout=args.color_word_dropout,
            text_context_layers=args.text_context_layers,
        )
        b = _sd3_budget()
        if args.transformer_steps is not None or args.transformer_minutes is not None:
            b = replace(b, steps=args.transformer_steps, minutes=args.transformer_minutes)
        b = replace(b, batch_size=args.transformer_batch or b.batch_size,
                    lr=b.lr if args.transformer_lr is None else args.transformer_lr)
        if args.stages is not None:
            raise ValueError("--stages is for --arch unet; --arch sd3 trains the transformer only")
    except ValueError as e:
        return refused("train-tiny", e)
    out = train_tiny_sd3(
        args.out, cfg, budget=b, vae_from=args.vae_from, seed=args.seed, device=args.device, resume=args.resume,
        progress=not args.no_progress, log_every=args.log_every, checkpoint_minutes=args.checkpoint_minutes,
        command=["sdlens", *sys.argv[1:]], init_from=args.init_from, precision=args.precision,
    )
    print(out)
    return 0


# --- attend ----------------------------------------------------------------------------------


def add_attend(subparsers) -> None:
    p = subparsers.add_parser(
        "attend",
        help="generate an image and draw where each word of the prompt attends",
        description="Generate one image with cross-attention traced and write into --out: image.png, "
        "words.png (every word's map, and the start/end/padding slots with their share of the attention), "
        "word-II-WORD.png (one overlay per word), steps.gif (the maps over the denoising steps) and "
        "trace.safetensors (sdlens.load_trace). Arguments are checked before generating; a bad one "
        "stops with one line and writes nothing.",
    )
    p.add_argument(
        "prompt", help='the prompt, e.g. "a red circle on the left and a blue square on the right"'
    )
    add_generation_options(p)
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt")
    add_old_option(p, "--negative", "--negative-prompt")
    p.add_argument(
        "--words",
        nargs="+",
        default=None,
        metavar="WORD",
        help="words to draw (default: all words of the prompt); commas also separate",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: ./attend-PROMPT)")
    p.add_argument("--self-attn", action="store_true", help="also keep self-attention in the trace (larger)")
    p.add_argument("--concepts", nargs="+", default=None, metavar="WORD",
                   help="joint-attention models (--model tiny-sd3): ConceptAttention maps of these words, "
                   "into concepts.png (e.g. --concepts circle square background); commas also separate")
    p.add_argument("--text-attn", action="store_true",
                   help="joint-attention models (--model tiny-sd3): also trace the text tokens' queries and draw "
                   "each word's map both ways (pixels -> word, word -> pixels, where both agree) into directions.png")
    p.set_defaults(func=run_attend)


def run_attend(args: argparse.Namespace) -> int:
    from sdlens.commands.attend import AttendError, attend

    words = None if args.words is None else [w for arg in args.words for w in arg.split(",") if w.strip()]
    try:
        attend(
            args.prompt,
            model=args.model,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            size=args.size,
            words=words,
            out=args.out,
            device=args.device,
            self_attn=args.self_attn,
            concepts=None if args.concepts is None else [w for a in args.concepts for w in a.split(",") if w.strip()],
            text_attn=args.text_attn,
            progress=not args.no_progress,
        )
    except AttendError as e:
        return refused("attend", e)
    return 0


# --- edit ------------------------------------------------------------------------------------


def add_edit(subparsers) -> None:
    from sdlens.edit.inversion import INVERSIONS
    from sdlens.edit.run import METHODS

    p = subparsers.add_parser(
        "edit",
        help="edit an image through attention: swap, add or reweight words and keep the rest",
        description="Run the base prompt and the target prompt from one starting noise with an attention edit "
        "(sdlens.edit) and write into --out: side.png (base and edited side by side), base.png, edit.png, "
        "mask.png (with --blend), settings.json, and with --trace each branch's word maps and the trace. "
        "Arguments are checked before denoising; a bad one stops with one line and writes nothing.",
    )
    p.add_argument("base", help='the base prompt, e.g. "a red circle" (with --image: what the image shows)')
    p.add_argument("target", nargs="?", default=None,
                   help='the edited prompt, e.g. "a blue circle" (--method reweight: leave it out)')
    p.add_argument("--method", default="replace", choices=METHODS,
                   help="replace: swap words one for one (default); refine: add or remove words; reweight: "
                   "scale words' attention (--weights); inject_self: keep the base's self-attention; "
                   "mutual: the edit reads the base's keys and values")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: ./edit-BASE-to-TARGET)")
    add_generation_options(p)
    p.add_argument("--cross-window", default=None, metavar="F|A,B",
                   help="when the base's cross-attention maps are copied: a step fraction (0.8: the first 80%% of "
                   "the steps) or start,end fractions")
    add_old_option(p, "--cross-steps", "--cross-window")
    p.add_argument("--word-windows", nargs="+", default=None, metavar="WORD=F|A,B", help="per-word --cross-window")
    add_old_option(p, "--word-steps", "--word-windows", nargs="+")
    p.add_argument("--self-window", default=None, metavar="F|A,B",
                   help="when the base's self-attention is kept: a step fraction or start,end fractions")
    add_old_option(p, "--self-steps", "--self-window")
    p.add_argument("--blend", nargs="+", default=None, metavar="WORD",
                   help="local blend: change only where these words are")
    p.add_argument("--threshold", type=float, default=None, help="the blend mask's threshold, 0..1 (default 0.6)")
    p.add_argument("--weights", nargs="+", default=None, metavar="WORD=FACTOR",
                   help="scale words' attention in the edit, e.g. big=3 (negative: less of it)")
    p.add_argument("--image", default=None, metavar="FILE", help="edit this image (inverted with BASE)")
    p.add_argument("--inversion", default="ddim", choices=INVERSIONS,
                   help="how --image is inverted: ddim, or null-text (closer at high guidance; slower)")
    p.add_argument("--trace", action="store_true", help="also write each branch's word maps and the trace")
    p.set_defaults(func=run_edit)


def run_edit(args: argparse.Namespace) -> int:
    from sdlens.commands.edit import run_edit as edit
    from sdlens.errors import SdlensError

    try:
        edit(args.base, args.target, method=args.method, model=args.model, out=args.out, seed=args.seed,
             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, size=args.size,
             cross_window=args.cross_window, word_windows=args.word_windows, self_window=args.self_window,
             blend=args.blend, threshold=args.threshold,
             weights=args.weights, image=args.image, inversion=args.inversion, trace=args.trace, device=args.device,
             progress=not args.no_progress)
    except SdlensError as e:  # EditError, the command's own, and attend's checks
        return refused("edit", e)
    return 0


# --- sweep and report -------------------------------------------------------------------------


def add_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="trace attention over a whole prompt set (resumable; several processes with accelerate launch)",
        description="Generate and trace every (prompt, seed) of PROMPTS into --out: images, per-word maps "
        "(float16) and one record of figures per image, in shards written atomically; a rerun makes only "
        "what no shard holds. `accelerate launch -m sdlens sweep ...` splits the items across processes.",
    )
    p.add_argument("prompts", help="a text file (one prompt a line) or .jsonl (prompt, seed, negative_prompt, masks)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_generation_options(p, seed=False, size=False, device=False)  # each process takes Accelerate's device
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0, 1, ...) where a line gives none")
    p.add_argument("--layers", default=None, help="layers to trace (sdlens.trace's selector: a map side or a glob)")
    p.add_argument("--map-size", type=int, default=16, help="side of the stored word maps (default 16)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per pipeline call (and per shard)")
    add_old_option(p, "--batch", "--batch-size", type=int)
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from sdlens.commands.sweep import sweep
    from sdlens.errors import SdlensError

    layers = int(args.layers) if args.layers and args.layers.isdigit() else args.layers
    try:
        sweep(args.prompts, out=args.out, model=args.model, seeds=args.seeds, num_inference_steps=args.num_inference_steps,
              guidance_scale=args.guidance_scale, layers=layers, map_size=args.map_size, batch_size=args.batch_size,
              progress=not args.no_progress)
    except SdlensError as e:
        return refused("sweep", e)
    return 0


def add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="summarise a sweep folder: tables and figures",
                              description="Merge a sweep's shards into DIR/report: summary.md (attention mass "
                              "per slot kind and layer group, localisation per word kind and layer group, best "
                              "and worst prompts), mass.png and localisation.png.")
    p.add_argument("root", metavar="DIR", help="the sweep's --out folder")
    p.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    from sdlens.commands.sweep import report
    from sdlens.errors import SdlensError

    try:
        report(args.root)
    except SdlensError as e:
        return refused("report", e)
    return 0


# --- main ------------------------------------------------------------------------------------

# --- anatomy ---------------------------------------------------------------------------------

RANDOM_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "sd35", "flux", "sd15")


def add_anatomy(subparsers) -> None:
    p = subparsers.add_parser(
        "anatomy",
        help="where the transformers are in a model: attention layers, heads, map sizes, shares",
        description="List a pipeline's attention layers (diffusers module paths), their role (self, cross or "
        "SD3's joint), heads, map size at an image size, parameters, and the share of parameters and "
        "FLOPs that attention takes; then the text encoders.",
    )
    p.add_argument("--model", default="tiny",
                   help="'tiny' or 'tiny-sd3' (built-in), a local diffusers folder, a hub id, or random:FAMILY with FAMILY one of "
                   + ", ".join(RANDOM_FAMILIES) + " (random weights, real layout; sd15 is SD 1.5's full-size UNet)")
    p.add_argument("--size", default=None, help="image size HxW or N (default: the model's own)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one denoiser call on zeros)")
    p.set_defaults(func=run_anatomy)


def run_anatomy(args: argparse.Namespace) -> int:
    from sdlens.anatomy import anatomy

    if args.model.startswith("random:"):
        from sdlens.models import families

        fam = args.model.split(":", 1)[1]
        if fam not in RANDOM_FAMILIES:
            return refused("anatomy", ValueError(f"unknown family {fam!r}; choose one of {', '.join(RANDOM_FAMILIES)}"))
        pipe = families.sd15_layout(width=320) if fam == "sd15" else families.FAMILIES[fam]()
    else:
        import sdlens

        try:
            pipe = sdlens.load_pipeline(args.model)
        except (OSError, ValueError) as e:
            return refused("anatomy", ValueError(f"cannot load model {args.model!r}: {e}"))
    height = width = None
    if args.size:
        try:
            height, width = (int(v) for v in (args.size.lower().split("x") * 2)[:2])
        except ValueError:
            return refused("anatomy", ValueError(f"--size {args.size!r} is not N or HxW (e.g. 64 or 64x96)"))
    print(anatomy(pipe, height, width, flops=not args.no_flops))
    return 0


# --- web -------------------------------------------------------------------------------------


def add_web(subparsers) -> None:
    p = subparsers.add_parser(
        "web",
        help="a static web page that runs the built-in model in the browser, with word maps per step",
        description="Export the built-in model to ONNX and write a page that runs it in the browser "
        "(onnxruntime-web, shipped with sdlens): a prompt, the picture, one attention map per word, a step "
        "slider. Serve the folder with any static server, e.g. python -m http.server -d DIR; no network needed.",
    )
    p.add_argument("--out", required=True, help="the folder to write (created; files in it are replaced)")
    p.add_argument("--model", default="tiny", help="the built-in model to export: 'tiny' (the only one the page runs)")
    p.add_argument("--seeds", type=int, default=1000,
                   help="seeds the page can use: their initial noise is shipped (default 1000: seeds 0-999)")
    p.set_defaults(func=run_web)


def run_web(args: argparse.Namespace) -> int:
    from sdlens.web.export import write_page

    try:
        out = write_page(args.out, model=args.model, seeds=args.seeds)
    except (ValueError, FileNotFoundError) as e:
        return refused("web", e)
    print(f"{out}/index.html")
    print(f"serve it: python -m http.server -d {out}  (then open http://localhost:8000)")
    return 0


SUBCOMMANDS = [add_train_tiny, add_attend, add_edit, add_sweep, add_report, add_anatomy, add_web]  # each adds one subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlens", description="A lens on Stable Diffusion's attention.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
