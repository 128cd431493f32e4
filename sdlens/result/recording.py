"""The maps' storage while a trace records: one tensor per (kind, layer), filled step by step.

A ``Recording`` is the mapping ``(kind, layer) → (steps, rows, heads, queries, keys)`` that an
``AttentionTrace`` reads: while the run goes, the steps written so far; after ``finish``, the
final tensors on the storage device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..errors import CaptureError
from .pinned import page_lock, page_unlock


class StepStorage:
    """The storage of one (kind, layer) while a trace records: ``(capacity, rows, heads, n, keys)``.

    Allocated at the layer's first step for the number of steps the run will keep (known before the
    first step when the pipeline says how many it runs), on the storage device; each step is copied
    into its slot, so the maps are never held twice. With no known number of steps the storage
    doubles as it fills, and is trimmed to the steps written at the end.

    Maps made on a GPU and stored on the CPU are copied asynchronously into storage page-locked in
    place (``pinned``), so GPU memory does not grow with the trace and the host does not wait for
    the GPU mid-run. Where page-locking fails, copies are ordinary (synchronous) ones.
    """

    def __init__(self, probs: torch.Tensor, capacity: int | None, device, dtype: torch.dtype,
                 max_steps: int | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = probs.shape
        self.source = probs.device  # where the maps are made
        # a CUDA -> host copy is asynchronous only into page-locked memory
        self.pinned = probs.device.type == "cuda" and self.device.type == "cpu"
        self.cast_first = probs.device != self.device  # cast where the maps were made: half the bytes to move
        self.count = 0
        self.max_steps = max_steps  # growth never passes this (a memory budget), when set
        self.written: list[bool] = []
        self.buffer: torch.Tensor | None = None
        self._allocate(max(1, capacity or 8))

    def _allocate(self, steps: int) -> None:
        buffer = torch.empty((steps, *self.shape), dtype=self.dtype, device=self.device)
        if self.pinned and not page_lock(buffer):
            self.pinned = False
        old = self.buffer
        if old is not None:
            buffer[: self.count].copy_(old[: self.count])
            self._unlock(old)
        self.buffer = buffer
        self.slots = buffer.unbind(0)  # one view per step, made once (indexing per call costs an op)
        self.written += [False] * (steps - len(self.written))

    def write(self, slot: int, probs: torch.Tensor, layer: str = "") -> None:
        if probs.shape != self.shape:
            raise CaptureError(
                f"attention of shape {tuple(probs.shape)} at step slot {slot}, but earlier steps of layer "
                f"{layer!r} had {tuple(self.shape)}: the batch or the image size changed within one traced call"
            )
        if slot >= len(self.slots):  # more steps than expected: grow (rare: unknown step count)
            self.wait()
            grown = 2 * len(self.slots) if self.max_steps is None else min(2 * len(self.slots), self.max_steps)
            self._allocate(max(slot + 1, grown))
        if self.written[slot]:
            raise CaptureError(
                f"layer {layer!r} was called twice in one denoiser call; a trace keeps one map per layer and "
                "step: leave this layer out (layers=...)"
            )
        if self.cast_first:
            probs = probs.to(self.dtype)
        self.slots[slot].copy_(probs, non_blocking=self.pinned)
        self.written[slot] = True
        self.count = max(self.count, slot + 1)

    def wait(self) -> None:
        """Wait until the asynchronous copies into this storage have landed."""
        if self.pinned:
            torch.cuda.synchronize(self.source)

    def filled(self) -> torch.Tensor:
        """The steps written so far, ``(count, rows, heads, n, keys)`` (a view)."""
        self.wait()
        return self.buffer[: self.count]

    def result(self, steps: int | None = None) -> torch.Tensor:
        """The final tensor ``(steps, ...)`` (default: the steps written), page-locking released: the
        storage itself, or a copy of its first ``steps`` where fewer came than were allocated (an
        interrupted run, an unknown step count). Steps a layer was not called at (it skipped them, or
        the run stopped before it) hold NaN, not stale memory."""
        self.wait()
        n = self.count if steps is None else steps
        for slot in range(min(n, len(self.written))):
            if not self.written[slot]:
                self.buffer[slot].fill_(float("nan"))
        if n > self.buffer.shape[0]:
            self._allocate(n)
            self.buffer[self.count:].fill_(float("nan"))
        out = self.buffer if n == self.buffer.shape[0] else self.buffer[:n].clone()
        self._unlock(self.buffer)
        return out

    def _unlock(self, buffer: torch.Tensor) -> None:
        if self.pinned:
            page_unlock(buffer)



class Recording(Mapping):
    """``(kind, layer) → (steps, rows, heads, n, keys)``: storage while recording, tensors after ``finish``.

    ``capacity``: the number of steps the run will keep, when known (storage is allocated once);
    ``device``, ``dtype``: where and how the maps are stored.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.capacity: int | None = None
        self.max_steps: int | None = None
        self.storage: dict[tuple[str, str], StepStorage] = {}
        self.done: dict[tuple[str, str], torch.Tensor] | None = None

    def write(self, kind: str, layer: str, probs: torch.Tensor, slot: int) -> None:
        """Write one step's ``probs`` ``(rows, heads, n, keys)`` at captured-step position ``slot``."""
        key = (kind, layer)
        store = self.storage.get(key)
        if store is None:
            store = self.storage[key] = StepStorage(probs, self.capacity, self.device, self.dtype, self.max_steps)
        store.write(slot, probs, layer)

    def finish(self, steps: int | None = None) -> None:
        """Wait for asynchronous copies, release page-locking, keep the final tensors: ``steps`` steps
        in every layer (a step some layer did not reach is NaN there; one past it is dropped)."""
        if self.done is not None:
            return
        for device in {s.source for s in self.storage.values() if s.pinned}:  # one synchronize per GPU
            torch.cuda.synchronize(device)
        self.done = {key: s.result(steps).to(self.device) for key, s in self.storage.items()}
        self.storage = {}

    @property
    def recording(self) -> bool:
        return self.done is None

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        if self.done is not None:
            return self.done[key]
        return self.storage[key].filled()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.done if self.done is not None else self.storage)

    def __len__(self) -> int:
        return len(self.done if self.done is not None else self.storage)


__all__ = ["Recording", "StepStorage"]
