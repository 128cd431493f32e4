"""A sweep's items: (prompt, seed) pairs read from a prompt file, and which process makes which.

A prompt file is plain text (one prompt a line; empty lines and lines starting with ``#`` are
skipped) or JSON Lines (``.jsonl``: one object a line with ``prompt`` and optionally ``seed``,
``negative_prompt`` and ``masks``, a dict from a word of the prompt to a mask image's path,
relative to the file). Every prompt gets ``seeds`` seeds (0, 1, …) unless its line gives one.

Item ids are their place in the file and their seed (``000012-s3``): the same file and settings
give the same ids, whatever the number of processes. The items are cut into batches in order, and
process ``rank`` of ``num_processes`` makes the batches ``rank, rank + num_processes, …`` (``assign``):
every batch holds the same items whatever the number of processes, so one process and many compute
exactly the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SweepError
from ..vocabulary import renamed


@dataclass(frozen=True)
class Item:
    """One image of a sweep."""

    id: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    masks: dict[str, str] = field(default_factory=dict)  # word -> mask image path (absolute)


def read_items(path: str | Path, seeds: int = 1) -> list[Item]:
    """The items of a prompt file (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no prompt file at {str(path)!r}: give a text file (one prompt a line) or a .jsonl file")
    if not isinstance(seeds, int) or seeds < 1:
        raise SweepError(f"seeds must be a positive int; got {seeds!r}")
    items: list[Item] = []
    jsonl = path.suffix.lower() == ".jsonl"
    index = -1  # the prompt's place among the file's prompts
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        index += 1
        if jsonl:
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as e:
                raise SweepError(f"{path.name}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
                raise SweepError(f"{path.name}, line {n}: each line needs a non-empty \"prompt\"")
            unknown = set(entry) - {"prompt", "seed", "negative_prompt", "masks"}
            if unknown:
                raise SweepError(f"{path.name}, line {n}: unknown key(s) {sorted(unknown)}; valid: prompt, seed, "
                                 "negative_prompt, masks")
            masks = entry.get("masks") or {}
            if not isinstance(masks, dict):
                raise SweepError(f"{path.name}, line {n}: \"masks\" must map words to mask image paths")
            masks = {w: str((path.parent / p).resolve()) for w, p in masks.items()}
            for w, p in masks.items():
                if not Path(p).is_file():
                    raise SweepError(f"{path.name}, line {n}: the mask of {w!r} ({p}) is not a file")
            own = entry.get("seed")
            if own is not None and (not isinstance(own, int) or isinstance(own, bool)):
                raise SweepError(f"{path.name}, line {n}: \"seed\" must be an int")
            for s in [own] if own is not None else range(seeds):
                items.append(Item(f"{index:06d}-s{s}", entry["prompt"].strip(), int(s),
                                  entry.get("negative_prompt"), masks))
        else:
            for s in range(seeds):
                items.append(Item(f"{index:06d}-s{s}", text, s))
    if not items:
        raise SweepError(f"{str(path)!r} holds no prompts")
    return items


@renamed(world="num_processes", batch="batch_size")
def assign(items: list[Item], rank: int, num_processes: int, batch_size: int = 1) -> list[list[Item]]:
    """The batches process ``rank`` of ``num_processes`` makes: the items cut into batches of
    ``batch_size`` in order, every ``num_processes``-th batch from ``rank``."""
    if not 0 <= rank < num_processes:
        raise SweepError(f"rank {rank} is not in 0..{num_processes - 1}")
    if batch_size < 1:
        raise SweepError(f"batch_size must be at least 1; got {batch_size}")
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[rank::num_processes]


__all__ = ["Item", "SweepError", "assign", "read_items"]
