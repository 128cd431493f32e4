"""Running a sweep into a folder that survives being killed, and reading it back.

The folder::

    settings.json                 what every item is made with; a run with other settings is refused
    images/<id>.png               each item's image
    shards/r<rank>-<first id>.safetensors
                                  one per batch: the batch's word maps (float16, "<id>/<word index>")
                                  and its records (JSON in the header, with a checksum of every tensor)
    bad/                          shards that could not be read, moved aside (their items are redone)

A shard is written last and atomically, so an item is finished exactly when a readable shard holds
it: a process killed at any moment loses only the batch in flight, and a rerun makes exactly the
items no shard holds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import CaptureError, warn
from ..files import atomic_file
from ..result import io
from ..vocabulary import renamed
from .items import Item, SweepError, assign
from .records import item_record

FORMAT = "sdlens.sweep"


class SweepFolder:
    """A sweep's output folder (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.shards = self.root / "shards"
        self.bad = self.root / "bad"

    def prepare(self, settings: dict) -> None:
        """Create the folder, or check that it was made with the same ``settings``."""
        if self.root.exists() and not self.root.is_dir():
            raise SweepError(f"--out {str(self.root)!r} is a file, not a folder")
        path = self.root / "settings.json"
        if path.is_file():
            saved = current_settings(json.loads(path.read_text()).get("settings", {}))
            differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if differ:
                detail = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
                raise SweepError(f"{str(self.root)!r} holds a sweep made with other settings ({detail}); "
                                 "use another --out folder, or the same settings to resume it")
        for d in (self.images, self.shards):
            d.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps({"format": FORMAT, "settings": settings}, indent=1) + "\n")

    def shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("*.safetensors"))

    def read_shard(self, path: Path) -> tuple[dict, list[dict]] | None:
        """``(maps, records)`` of a shard; None (warned, moved to ``bad/``) when it cannot be read."""
        try:
            tensors, meta = io.read(path)
            records = meta["records"]
        except (CaptureError, KeyError, OSError) as e:
            warn(f"sweep shard {path.name} cannot be read ({str(e).splitlines()[0]}); its items will be made again")
            self.bad.mkdir(exist_ok=True)
            try:
                shutil.move(str(path), str(self.bad / path.name))
            except FileNotFoundError:  # another process moved it first
                pass
            return None
        return tensors, records

    def done(self) -> set[str]:
        """Ids of the items a readable shard holds."""
        ids: set[str] = set()
        for path in self.shard_files():
            read = self.read_shard(path)
            if read is not None:
                ids.update(r["id"] for r in read[1])
        return ids

    def write_batch(self, rank: int, records: list[dict], maps: dict[str, torch.Tensor],
                    images: list[np.ndarray]) -> Path:
        from PIL import Image

        for rec, image in zip(records, images):
            with atomic_file(self.images / f"{rec['id']}.png", suffix=".png") as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        path = self.shards / f"r{rank}-{records[0]['id']}.safetensors"
        io.write(path, maps, {"kind": FORMAT, "records": records})
        return path


def _masks(item: Item, size: tuple[int, int]) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for word, path in item.masks.items():
        m = Image.open(path).convert("L").resize((size[1], size[0]), Image.NEAREST)
        out[word] = np.asarray(m) > 127
    return out


SETTINGS_RENAMED = {"steps": "num_inference_steps", "guidance": "guidance_scale", "batch": "batch_size"}
"""The old names of a sweep's settings (in ``settings.json`` of sweeps made before the vocabulary)."""


def current_settings(settings: dict, *, warn_old: bool = False) -> dict:
    """``settings`` with their old names (``SETTINGS_RENAMED``) replaced; ``warn_old``: say so, as a
    ``DeprecationWarning`` (a caller's dict; a folder's old settings.json is read silently)."""
    old = [k for k in settings if k in SETTINGS_RENAMED]
    if not old:
        return dict(settings)
    both = [k for k in old if SETTINGS_RENAMED[k] in settings]
    if both:
        raise SweepError(f"settings give {both[0]!r} and {SETTINGS_RENAMED[both[0]]!r}: {both[0]!r} is the old name "
                         f"of {SETTINGS_RENAMED[both[0]]!r}; give {SETTINGS_RENAMED[both[0]]!r} only")
    if warn_old:
        from ..errors import warn

        warn("sweep settings " + ", ".join(f"{k!r} are now {SETTINGS_RENAMED[k]!r}" for k in old), DeprecationWarning)
    return {SETTINGS_RENAMED.get(k, k): v for k, v in settings.items()}


@renamed(world="num_processes", batch="batch_size")
def run_sweep(pipe, items: list[Item], out: str | os.PathLike, settings: dict, *, rank: int = 0,
              num_processes: int = 1, batch_size: int = 4, progress: Callable[[int], None] | None = None) -> list[str]:
    """Make this process's share of ``items`` that no shard holds yet; returns the ids made.

    ``settings``: ``num_inference_steps``, ``guidance_scale``, ``map_size`` and ``layers`` (a
    ``sdlens.trace`` layer selector), plus anything else that defines the sweep (they are recorded
    and compared). ``progress(n)`` is called after each batch with the number of items it made.
    """
    from ..capture import trace

    settings = current_settings(settings, warn_old=True)
    folder = SweepFolder(out)
    folder.prepare(settings)
    done = folder.done()
    made = []
    for chunk in assign(items, rank, num_processes, batch_size):
        chunk = [i for i in chunk if i.id not in done]  # a whole batch, unless --batch changed
        if not chunk:
            continue
        negatives = [i.negative_prompt or "" for i in chunk]
        with trace(pipe, layers=settings.get("layers")) as tr:
            result = pipe([i.prompt for i in chunk], negative_prompt=negatives if any(negatives) else None,
                          num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                          generator=[torch.Generator("cpu").manual_seed(i.seed) for i in chunk], output_type="np")
        images = (np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8)
        records, maps = [], {}
        for k, item in enumerate(chunk):
            rec, word_maps = item_record(tr, k, images[k], _masks(item, images.shape[1:3]), settings["map_size"])
            records.append({"id": item.id, "seed": item.seed, "rank": rank, **rec})
            maps.update({f"{item.id}/{w}": m for w, m in word_maps.items()})
        folder.write_batch(rank, records, maps, list(images))
        del tr, result, records, maps
        _release_memory()  # the batch's trace is gone: hand its pages back, so a long sweep's memory stays flat
        made += [i.id for i in chunk]
        if progress is not None:
            progress(len(chunk))
    return made


def _release_memory() -> None:
    """Free the last batch's trace now: its objects reference each other (capture, trace, recording),
    so only the cycle collector frees them, and waiting for it lets a long sweep's memory creep up
    (without this, peak resident memory grew from 538 to 636 MB between 20 and 200 items)."""
    import gc

    gc.collect(1)  # the young generations hold the batch's objects; a full pass would walk the whole pipeline


def load(root: str | os.PathLike, *, maps: bool = False):
    """The records of a sweep folder, sorted by id: a list of dicts, whatever is installed
    (``pandas.DataFrame(load(root))`` makes a table of them). ``maps=True``: each record also gets
    ``"maps"``, ``{word index: (s, s) tensor}``."""
    folder = SweepFolder(root)
    if not (folder.root / "settings.json").is_file():
        raise SweepError(f"{str(root)!r} is not a sweep folder (it has no settings.json)")
    records = []
    for path in folder.shard_files():
        read = folder.read_shard(path)
        if read is None:
            continue
        tensors, recs = read
        for r in recs:
            if maps:
                r = dict(r, maps={k.split("/")[1]: v for k, v in tensors.items() if k.startswith(r["id"] + "/")})
            records.append(r)
    records.sort(key=lambda r: r["id"])
    return records


__all__ = ["SETTINGS_RENAMED", "SweepFolder", "current_settings", "load", "run_sweep"]
