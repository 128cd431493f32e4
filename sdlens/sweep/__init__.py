"""Attention over a whole prompt set: ``sdlens sweep`` and ``sdlens report``, resumable, on one
process or many (Hugging Face Accelerate launches them).

    from sdlens.sweep import read_items, run_sweep, load
    items = read_items("prompts.txt", seeds=2)
    run_sweep(pipe, items, "runs/sweep", {"num_inference_steps": 25, "guidance_scale": 7.5, "map_size": 16, "layers": None})
    records = load("runs/sweep")          # a list: one dict per image (pandas.DataFrame(records) for a table)
"""

from .items import Item, SweepError, assign, read_items
from .records import item_record, localisation
from .run import SweepFolder, load, run_sweep

__all__ = ["Item", "SweepError", "SweepFolder", "assign", "item_record", "load", "localisation", "read_items",
           "run_sweep"]
