"""One sweep item's figures, from its trace and its image.

- ``mass``: per map size (and ``"all"``), per step, the share of the cross-attention (averaged over
  layers of that size, heads and pixels) that goes to the start slot, the words, the end slot and
  the padding: ``{"16": {"start": [...], "word": [...], "end": [...], "pad": [...]}, ...}``; for a
  joint-attention model (SD 3) also T5's slots (``"t5"``), the shares being of the text part of the
  pixels' attention.
- ``words``: per word of the prompt, its map's entropy (of the map scaled to sum 1, divided by the
  log of the number of pixels: 1 is flat) and peak position (``(y, x)`` in 0..1); where a true mask
  is known, the map's IoU with it and whether its peak is on it, over all layers and per map size.

A true mask is known for a word given one in the prompt file, and on shapes-world captions for
each object's colour and shape words (the analyzer's object of that colour in the generated
image, as ``benchmarks/quality.py`` measures).
"""

from __future__ import annotations

import numpy as np
import torch

from ..analysis import SLOT_KINDS, kind_shares, localisation, map_entropy, peak_position
from ..vocabulary import renamed


def slot_mass(tr, prompt: int) -> dict:
    """``{size: {kind: [share per step]}}`` over the cross-attention layers of each map size, and ``"all"``."""
    kinds = list(tr.tokenization(prompt).kinds)
    row = prompt  # a sweep traces the conditional rows, one image per prompt: row i is prompt i
    per_size: dict[str, list[torch.Tensor]] = {}
    for layer in tr.layers_of("cross"):
        m = tr.maps(layer, "cross")[:, row].float()  # (steps, heads, h, w, slots)
        per = m.mean(dim=(1, 2, 3))  # (steps, slots)
        per_size.setdefault(str(tr.map_size(layer)[0]), []).append(per)
    per_size["all"] = [p for v in list(per_size.values()) for p in v]
    out = {}
    for size, maps in per_size.items():
        shares = kind_shares(torch.stack(maps).mean(0), kinds)  # {kind: (steps,)}
        out[size] = {k: [round(float(x), 5) for x in v] for k, v in shares.items()}
    return out


def truths(prompt: str, image: np.ndarray, given: dict[str, np.ndarray]) -> dict[int, tuple[str, np.ndarray]]:
    """Word index → (word kind, true mask): the given masks, else the shapes world's objects."""
    words = prompt.split()
    out: dict[int, tuple[str, np.ndarray]] = {}
    for w, mask in given.items():
        for i, word in enumerate(words):
            if word.lower().strip(",.") == w.lower():
                out[i] = ("given", mask)
    if out:
        return out
    from ..world import analyze, object_words, parse_caption

    try:
        scene, indices = parse_caption(prompt), object_words(prompt)
    except ValueError:
        return {}
    detected = analyze(image)
    for obj, index in zip(scene.objects, indices):
        det = next((d for d in detected if d.color == obj.color), None)
        if det is not None:
            out[index["color"]] = ("colour", det.mask)
            out[index["shape"]] = ("shape", det.mask)
    return out


@renamed(tr="trace")
def item_record(trace, prompt_index: int, image: np.ndarray, given: dict[str, np.ndarray], map_size: int
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(figures, {word index: (map_size, map_size) float16 map})`` of one prompt of a trace."""
    h, w = image.shape[:2]
    prompt = trace.prompts[prompt_index]
    truth = truths(prompt, image, given)
    sizes = sorted({trace.map_size(layer)[0] for layer in trace.layers_of("cross")})
    words, maps = [], {}
    for i, word in enumerate(trace.words(prompt_index)):
        full = trace.word_map(i, prompt_index=prompt_index, size=(h, w)).float()
        entry = {"word": word, "entropy": round(map_entropy(full), 4),
                 "peak": [round(x, 4) for x in peak_position(full)]}
        if i in truth:
            kind, mask = truth[i]
            entry["kind"] = kind
            entry["all"] = localisation(full, mask)
            for s in sizes:
                entry[str(s)] = localisation(trace.word_map(i, prompt_index=prompt_index, size=(h, w), layers=s), mask)
        words.append(entry)
        maps[str(i)] = torch.nn.functional.interpolate(full[None, None], size=(map_size, map_size), mode="area")[0, 0].half()
    return {"prompt": prompt, "mass": slot_mass(trace, prompt_index), "words": words}, maps


__all__ = ["SLOT_KINDS", "item_record", "localisation", "slot_mass", "truths"]
