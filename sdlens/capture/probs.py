"""From queries and keys to stored attention probabilities.

The processors (``processor``) hand over each captured layer call's queries and keys as a
``Pending``; when the denoiser's call returns, ``compute_pending`` turns the step's calls into
probabilities, batching the layers whose scores have the same shape: one cast, matmul, softmax and
head reduction per group instead of per layer. Probabilities come from an explicit float32 softmax
(``attention_probs``), in query chunks so that large self-attention maps never need one huge
temporary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .processor import CaptureProcessor

# Elements of one float32 score chunk (rows × heads × queries × keys): 8 Mi = 32 MB, of which a few
# are alive at once. SD 1.5's 64×64 self-attention (8 heads, 4096 keys) then takes 256 queries a chunk.
CHUNK_ELEMENTS = 1 << 23


# Score elements (rows × heads × queries × keys, all layers) one batched computation may take. On a
# GPU, where each op costs a launch, large batches pay; on a CPU a batch's float32 scores should stay
# in cache (4 MB), or the softmax and head mean become memory-bound: about one 32×32 map of SD 1.5.
GROUP_ELEMENTS = {False: 1 << 20, True: 1 << 25}


# Bytes of queries and keys (whole CFG batch) a step may hold back before they are turned into
# probabilities early: a large model (SDXL at 1024 px has 70 cross-attention layers) must not keep a
# whole step's worth on a GPU that is near its limit. SD 1.5 at 512 px holds about 40 MB a step.
PENDING_BYTES = 1 << 26


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention ``(b, heads, n, k)`` in float32, computed in query chunks.

    ``mask`` is an additive bias, or a boolean mask (True: may attend) as SDPA takes, broadcastable
    to ``(b, heads, n, k)``. ``reduce`` (e.g. the mean over heads) is applied to each chunk of
    probabilities as it is made, so that a large map is never held with all its heads: the result
    is then ``reduce``'s shape, ``(b, heads', n, k)``. Scores are formed in float32 (half-precision
    scores would cost probabilities ~1% of their value); few ops per chunk, since this runs for
    every captured layer at every step.
    """
    b, h, n, _ = q.shape
    kk = k.shape[2]
    if mask is not None and mask.dtype == torch.bool:  # SDPA's boolean masks: True = may attend
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    q = q.float() * scale
    kt = k.float().transpose(-1, -2)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * kk))
    out = None
    for s in range(0, n, chunk):
        scores = q @ kt if chunk >= n else q[:, :, s : s + chunk] @ kt  # the common case: one chunk
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 or chunk >= n else mask[:, :, s : s + chunk]).float()
        probs = scores.softmax(dim=-1)
        del scores  # before the next chunk's scores are made
        if reduce is not None:
            probs = reduce(probs)
        if chunk >= n:
            return probs
        if out is None:
            out = torch.empty(probs.shape[0], probs.shape[1], n, kk, dtype=probs.dtype, device=probs.device)
        out[:, :, s : s + chunk] = probs
        del probs
    return out


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
    """One captured layer call whose probabilities are still to be computed."""

    processor: CaptureProcessor
    q: torch.Tensor  # (b, heads, n, d)
    k: torch.Tensor  # (b, heads, keys, d)
    scale: float
    bias: torch.Tensor | None  # additive, (b, heads, 1 | n, keys)
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
        first.processor.store(probs, first.n_img_keys)
        return
    # the kept rows of each layer (views), then one copy into (L·rows, ...)
    q = torch.cat([take(it.q, it.rows) for it in items])
    k = torch.cat([take(it.k, it.rows) for it in items])
    probs = attention_probs(q, k, first.scale, None, reduce=reduce)
    for it, p in zip(items, probs.split(q.shape[0] // len(items))):
        it.processor.store(p, it.n_img_keys)
