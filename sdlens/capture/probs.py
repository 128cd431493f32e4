"""From the queries and keys of a step's captured calls to stored attention probabilities.

The capture controller notes each captured layer call's queries and keys as a ``Pending``; when the
denoiser's call returns, ``compute_pending`` turns the step's calls into probabilities, batching the
layers whose scores have the same shape: one cast, matmul, softmax and head reduction per group
instead of per layer. Probabilities come from an explicit float32 softmax
(``hooks.attention.attention_probs``), in query chunks so that large self-attention maps never
need one huge temporary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..hooks.attention import CHUNK_ELEMENTS, attention_probs

# Score elements (rows × heads × queries × keys, all layers) one batched computation may take. On a
# GPU, where each op costs a launch, large batches pay; on a CPU a batch's float32 scores should stay
# in cache (4 MB), or the softmax and head mean become memory-bound: about one 32×32 map of SD 1.5.
GROUP_ELEMENTS = {False: 1 << 20, True: 1 << 25}


# Bytes of queries and keys (whole CFG batch) a step may hold back before they are turned into
# probabilities early: a large model (SDXL at 1024 px has 70 cross-attention layers) must not keep a
# whole step's worth on a GPU that is near its limit. SD 1.5 at 512 px holds about 40 MB a step.
PENDING_BYTES = 1 << 26


# The kept rows of a batch: a slice (a view) when they are contiguous, else an index tensor;
# None where the tensors hold only the kept rows already.
Rows = slice | torch.Tensor | None


def take(x: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    """The kept ``rows`` of ``x`` along ``dim``."""
    if rows is None:
        return x
    if isinstance(rows, slice):
        return x[(slice(None),) * dim + (rows,)]
    return x.index_select(dim, rows if rows.device == x.device else rows.to(x.device))


def n_rows(batch: int, rows: Rows) -> int:
    """How many of a batch's ``batch`` rows ``rows`` keeps."""
    if rows is None:
        return batch
    return len(range(batch)[rows]) if isinstance(rows, slice) else len(rows)


class Pending(NamedTuple):
    """One captured layer call whose probabilities are still to be computed; ``store(probs, n_img_keys)``
    keeps them when they are."""

    store: Callable[[torch.Tensor, int], None]
    q: torch.Tensor  # (b, heads, n, d)
    k: torch.Tensor  # (b, heads, keys, d)
    scale: float
    bias: torch.Tensor | None  # additive or boolean, (b, heads, 1 | n, keys)
    n_img_keys: int
    rows: Rows  # which of the b rows are kept

    def group(self) -> tuple | None:
        """Calls with equal group keys are computed as one batch; None: on its own (a mask)."""
        if self.bias is not None:
            return None
        rows = (self.rows.start, self.rows.stop, self.rows.step) if isinstance(self.rows, slice) else id(self.rows)
        return (self.q.shape, self.k.shape, self.q.dtype, self.k.dtype, self.q.device, self.scale, rows)


def compute_pending(
    pending: list[Pending], reduce: Callable[[torch.Tensor], torch.Tensor] | None, heads_kept: int | None = None
) -> None:
    """Turn the deferred calls of one step into probabilities and store them, same-shape layers in one batch.

    ``q`` of a group of L layers is stacked to ``(L·rows, heads, n, d)``: one cast, one matmul, one
    softmax and one head reduction for the group instead of for each layer. Rows never mix (the
    softmax is per row and head), so the result is the per-layer computation's. A group is cut so
    that its scores stay within ``GROUP_ELEMENTS`` and its reduced result (``heads_kept`` heads;
    None: all) within ``CHUNK_ELEMENTS``: large maps are computed one layer at a time.
    """
    groups: dict = {}
    for item in pending:
        groups.setdefault(item.group() or id(item), []).append(item)
    for items in groups.values():
        first = items[0]
        rows = n_rows(first.q.shape[0], first.rows)
        scores = rows * first.q.shape[1] * first.q.shape[2] * first.k.shape[2]  # per layer, all heads
        kept = rows * (heads_kept or first.q.shape[1]) * first.q.shape[2] * first.k.shape[2]
        budget = GROUP_ELEMENTS[first.q.device.type == "cuda"]
        size = max(1, min(budget // max(1, scores), CHUNK_ELEMENTS // max(1, kept)))
        for start in range(0, len(items), size):
            _compute_group(items[start : start + size], reduce)


def _compute_group(items: list[Pending], reduce) -> None:
    first = items[0]
    if len(items) == 1:
        bias = None if first.bias is None else take(first.bias, first.rows)
        probs = attention_probs(take(first.q, first.rows), take(first.k, first.rows), first.scale, bias, reduce=reduce)
        first.store(probs, first.n_img_keys)
        return
    # the kept rows of each layer (views), then one copy into (L·rows, ...)
    q = torch.cat([take(it.q, it.rows) for it in items])
    k = torch.cat([take(it.k, it.rows) for it in items])
    probs = attention_probs(q, k, first.scale, None, reduce=reduce)
    for it, p in zip(items, probs.split(q.shape[0] // len(items))):
        it.store(p, it.n_img_keys)


__all__ = ["GROUP_ELEMENTS", "PENDING_BYTES", "Pending", "Rows", "compute_pending", "n_rows", "take"]
