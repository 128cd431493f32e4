"""sdlens's vocabulary: the one name of each thing its public API takes, and the old names kept for a release.

``NAMES`` maps every keyword name of the public API (functions, methods, the explorers, the
``sdlens`` command's Python side) to its one meaning; a new keyword takes a name from it, or adds
its name here with a meaning no other name has. ``docs/vocabulary.md`` explains the choices.
``RENAMED`` maps each old keyword name to its new one, per function: ``renamed(old="new")`` keeps
the old name working for one release, with a ``DeprecationWarning`` that names the new one.

>>> @renamed(world="num_processes")
... def share(items, *, num_processes=1):
...     return num_processes
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     share([], world=2), caught[0].category.__name__
(2, 'DeprecationWarning')
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from .errors import SdlensError, warn

REMOVED_IN = "0.2"  # the release that drops the old names

# ------------------------------------------------------------------------------------------ the concepts
# The names the vocabulary page (docs/vocabulary.md) is about: concepts the API once named two ways.
CONCEPTS: dict[str, str] = {
    "prompt": "a prompt's text (a str, or a list of them for a batch)",
    "prompt_index": "which prompt of a run: an index into the trace's prompts (0 is the first)",
    "image": "a picture: a PIL image, an (H, W, 3) array or a (3, H, W) tensor",
    "image_index": "which of a prompt's pictures (num_images_per_prompt): 0 is its first",
    "half": "which half of a classifier-free-guidance batch: 'cond' or 'uncond'",
    "step": "one step index: steps count from 0 in sampling order; negative ones from the end of the run",
    "steps": "step indices: None (all), one index or a list of them (sdlens.trace's and the trace's selector)",
    "num_inference_steps": "a step count: how many denoising steps a run makes (diffusers' own name)",
    "cross_window": "when an edit copies the base's cross-attention: a step fraction in [0, 1] (0.8: the first "
                    "80% of the steps), a (start, end) pair of them, or {word: window}",
    "self_window": "when an edit keeps the base's self-attention: a step fraction or a (start, end) pair of them",
    "word_windows": "per-word cross_window: WORD=F or WORD=A,B (the edit command's --word-windows)",
    "guidance_scale": "the classifier-free guidance scale (diffusers' own name); 1 turns guidance off",
    "num_processes": "a process count: how many processes share a sweep (Accelerate's --num_processes)",
    "rank": "this process's index among num_processes, from 0",
    "batch_size": "how many pictures one pipeline call makes",
    "layer": "one attention layer, by its diffusers module path",
    "layers": "a layer selector: None (all), a name or glob, an int map side, a list of those, or a predicate",
    "head": "one attention head of a layer, by its index in the model",
    "heads": "a head selector: None (all kept, averaged), one head index or a list of them",
    "word": "a whitespace-separated word of the prompt: the word, its label ('red (2)') or its index",
    "words": "a list of words (each as `word`)",
    "slot": "a position among the text encoder's key slots (77 for CLIP): 0 is the start slot",
    "slots": "a list of slots",
    "kind": "an attention kind: 'cross', 'self', 'text_image', 'text_text', 'concept' or 'concept_image'",
    "space": "where a concept map is read: 'output' (ConceptAttention's attention-output similarity) or "
             "'attention' (the concept token's own attention over the image)",
    "direction": "which way a word map reads joint attention: 'image_text' (pixels → word), 'text_image' "
                 "(word → pixels) or 'both' (where the two agree)",
    "method": "an edit method: 'replace', 'refine', 'reweight', 'inject_self' or 'mutual'",
    "inversion": "how a real picture is inverted before editing: 'ddim' or 'null-text'",
    "negative_prompt": "the negative prompt's text (diffusers' own name)",
    "trace": "an AttentionTrace; as an edit's keyword: True or a dict of sdlens.trace's keywords, to trace the run",
}

# ------------------------------------------------------------------------------------------ every keyword
NAMES: dict[str, str] = {
    **CONCEPTS,
    # --- runs, pipelines, models
    "pipe": "a diffusers pipeline (sdlens.load_pipeline gives the built-in one)",
    "name": "a model: 'tiny', 'tiny-sd3', a diffusers pipeline folder or a hub id",
    "model": "a model, as `name` (the sdlens command's --model)",
    "device": "a torch device ('cpu', 'cuda', ...)",
    "dtype": "a torch dtype",
    "scheduler": "a diffusers scheduler",
    "seed": "a random seed (an int)",
    "seeds": "seeds per prompt: the prompts of a sweep get seeds 0..seeds-1",
    "generator": "a torch.Generator (or numpy's) drawing the randomness",
    "rng": "a random.Random drawing the randomness",
    "progress": "show a progress bar (a bool), or a callback told of progress",
    "log": "a function called with each line to print",
    "out": "an output folder",
    "path": "a file path",
    "root": "a sweep's output folder",
    "settings": "a dict of the settings a run was made with",
    "size": "a picture or map size: (H, W) or one side in pixels",
    "height": "a picture's height in pixels",
    "width": "a picture's width in pixels",
    "side": "a square panel's side in pixels",
    "latent_size": "the latent's (h, w): the picture's size over the VAE's factor",
    "map_size": "a map's side in cells",
    "display_size": "an explorer's picture side on screen, in pixels",
    "latent": "a latent tensor (1, C, h, w)",
    "maps": "attention maps: a dict of tensors",
    "info": "a TraceInfo: what a trace's maps belong to",
    "spec": "a capture spec (sdlens.trace's keywords)",
    "index": "a position in a sequence",
    "start": "where a range starts (a step fraction for a blend; an index for a sequence)",
    "stop": "where a range stops (an index)",
    "value": "a value",
    "key": "a cache key",
    "compute": "a function that computes a value",
    "max_items": "how many items a cache keeps",
    "event": "an ipywidgets event",
    "rgb": "a picture as uint8 (H, W, 3)",
    # --- what sdlens.trace records
    "cross": "capture cross-attention (a bool)",
    "self_attn": "capture self-attention too (a bool; larger)",
    "self_layers": "a layer selector for self-attention (default: as `layers`)",
    "text_attn": "capture joint attention's text queries (SD 3; a bool)",
    "concepts": "ConceptAttention's concepts: a list of words (SD 3)",
    "concept": "one concept, by name or index",
    "cfg": "which classifier-free-guidance halves a trace keeps: 'cond', 'uncond' or 'both'",
    "max_bytes": "the most memory a capture may take, in bytes",
    "record_latents": "record each step's latent and clean-picture estimate (a bool)",
    "encoder": "which text encoder's words: 1, or 2 for SDXL's prompt_2",
    "occurrence": "which occurrence of a word the prompt holds more than once (0, 1, ...)",
    "softmax": "apply a softmax over the concepts (a bool)",
    "pixel": "a picture pixel (y, x)",
    # --- tokens
    "tokenizer": "a transformers tokenizer",
    "max_length": "the text encoder's slot count",
    "text": "a caption or prompt's text",
    # --- edits
    "base": "an edit's base prompt (what the picture shows)",
    "target": "an edit's target prompt; in viz, a word, a special slot ('<pad>') or ('slot', i)",
    "targets": "a list of targets (as `target`)",
    "weights": "{word: factor}: scale those words' attention",
    "blend": "a local blend: a word, a list of words, a dict or a sdlens.edit.Blend",
    "blend_words": "the words an explorer's local blend follows",
    "threshold": "a cut-off on a 0..1 scale",
    "pool": "a max-pooling radius in map cells",
    "mutual": "read the base's keys and values instead of copying its maps (MasaCtrl; a bool)",
    "self_max_size": "the largest self-attention map side an edit touches",
    "tune_iterations": "null-text inversion's Adam steps per sampling step, at most",
    "learning_rate": "an optimiser's learning rate",
    "reconstruction": "a picture reconstructed from an inversion",
    "prompts": "a list of tokenized prompts",
    "sizes": "a list of map sides",
    # --- sweeps
    "items": "a sweep's items (sdlens.sweep.Item)",
    "given": "{word: true mask} given by the prompt file",
    "heat": "a heat map (H, W)",
    "mask": "a bool mask (H, W)",
    "records": "a list of sweep records (dicts)",
    "images": "a list of pictures",
    # --- figures and explorers
    "ax": "a matplotlib Axes to draw into",
    "alpha": "a heat map's opacity over the picture, 0..1",
    "cmap": "a matplotlib colour map's name",
    "scale": "how panels are coloured: 'each', 'shared', 'absolute', a number or (low, high)",
    "title": "a title",
    "colorbar": "draw a colour bar (a bool)",
    "ncols": "panels per row",
    "specials": "also draw the start, end and padding slots (a bool)",
    "by": "how a layer grid groups layers: 'layer' or 'size'",
    "max_steps": "the most steps drawn",
    "previews": "draw the denoising previews (a bool)",
    "preview": "which denoising preview beside the maps: 'x0', 'xt' or None",
    "fps": "frames per second",
    "hold": "frames the last picture is held for",
    "marker": "mark the query pixel (a bool)",
    "n_clusters": "how many clusters (k-means)",
    "n_components": "how many principal components",
    "iters": "iterations",
    "k": "how many clusters",
    "x": "points to cluster (n, d)",
    "grid": "a map's (h, w)",
    "rows": "one attention row per query (n, n)",
    "values": "cell values (2-D)",
    "vmin": "the lowest value of a colour scale",
    "vmax": "the highest value of a colour scale",
    "fmt": "a format string",
    "fontsize": "a font size in points",
    "color": "a colour (matplotlib's, or the shapes world's colour word)",
    "linewidth": "a line width in points",
    "region": "a bool region (H, W)",
    "region_label": "a region's legend label",
    "mask_label": "a mask's legend label",
    "legend": "draw a legend (a bool)",
    # --- maps
    "m": "a map",
    "eps": "a small number guarding a division",
    "grids": "maps of different sizes",
    # --- the shapes world
    "scene": "a shapes-world scene",
    "scenes": "a list of scenes",
    "caption": "a scene's caption",
    "n": "how many",
    "n_objects": "how many objects a scene has (1 or 2)",
    "free_prob": "the chance a caption gives no positions",
    "size_prob": "the chance an object gets a size word",
    "two_object_prob": "the chance a scene has two objects",
    "centers": "objects' centres (n, 2)",
    "radii": "objects' radii (n,)",
    "min_area_fraction": "the smallest object area found, as a share of the picture",
    "a": "a bool mask",
    "b": "another bool mask",
}

# ------------------------------------------------------------------------------------------ the old names
RENAMED: dict[str, dict[str, str]] = {}
"""``{function's qualified name: {old keyword: new keyword}}``, filled by ``renamed``."""


def renamed(**old_to_new: str) -> Callable:
    """A decorator: the old keyword names of a function keep working for one release.

    ``@renamed(steps="num_inference_steps")``: a call with ``steps=`` runs as with
    ``num_inference_steps=``, with a ``DeprecationWarning`` naming the new name (pointing at the
    caller's line); a call with both raises ``SdlensError``. The function's signature (what
    ``inspect.signature`` and ``help`` show) is its own, new names only.
    """
    def wrap(func: Callable) -> Callable:
        params = inspect.signature(func).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for old, new in old_to_new.items():
            if old in params or not (new in params or open_kwargs):
                raise TypeError(f"renamed({old}={new!r}) does not fit {func.__qualname__}{inspect.signature(func)}")
        where = f"{func.__qualname__.replace('.__init__', '')}()"

        @functools.wraps(func)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise SdlensError(f"{where} got {old}= and {new}=: {old} is the old name of {new}; "
                                          f"pass {new}= only")
                    warn(f"{where}: {old}= is now {new}= ({old}= stops working in sdlens {REMOVED_IN})",
                         DeprecationWarning)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        key = f"{func.__module__}.{func.__qualname__}"
        RENAMED[key] = {**RENAMED.get(key, {}), **old_to_new}
        return call

    return wrap


def new_name_of(name: str) -> str | None:
    """The new name of an old keyword ``name`` (as any function renamed it), or None."""
    for pairs in RENAMED.values():
        if name in pairs:
            return pairs[name]
    return None


__all__ = ["CONCEPTS", "NAMES", "RENAMED", "REMOVED_IN", "new_name_of", "renamed"]
