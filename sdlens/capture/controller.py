"""``Capture``: the controller that records attention maps, on the hooks of ``sdlens.hooks``.

At the denoiser's first call it resolves the spec against the run (which layers, at which map
sizes; which steps; which rows of the batch; which heads), estimates the memory the maps will take
and checks the budget, all before any attention is computed. While a kept step runs it observes
each hooked layer's queries and keys (``qkv``), holds them back, and when the denoiser's call
returns turns the step's calls into probabilities, same-shape layers together (``probs``), and
writes them into the recording. Where an editor makes the layer compute explicit probabilities,
it keeps those (``probs`` point): what the model really used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange

from ..errors import BudgetError, CaptureError, TraceWarning, warn
from ..hooks.attention import concept_probs
from ..hooks.layers import CONCEPT_KINDS, TEXT_KINDS, LayerInfo, infer_map_size, is_flux
from ..hooks.processor import Call, Controller
from ..hooks.run import Run
from ..result.attention_trace import AttentionTrace, TraceInfo
from ..result.recording import Recording
from ..select import select_steps
from ..tokens import load_clip_tokenizer, tokenize
from . import probs
from .concepts import concept_scores, embed_concepts
from .denoising import DenoisingRecorder
from .probs import Pending, Rows, compute_pending, take
from .spec import CFG_HALVES, CaptureSpec, Estimate


def _describe(selector):
    """A layer selector as JSON can hold it (a predicate becomes a placeholder)."""
    if isinstance(selector, (str, int, type(None))):
        return selector
    if isinstance(selector, (list, tuple)):
        return list(selector)
    return "<predicate>"


class Capture(Controller):
    """Records the attention maps a ``CaptureSpec`` asks for into an ``AttentionTrace`` (``.trace``)."""

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        self.info = TraceInfo(kinds=spec.kinds, spec={
            "cross": spec.cross,
            "self_attn": spec.self_attn,
            "text_attn": spec.text_attn,
            "concepts": spec.concepts,
            "layers": _describe(spec.layers),
            "self_layers": _describe(spec.self_layers),
            "steps": spec.steps if spec.steps is None or isinstance(spec.steps, int) else list(spec.steps),
            "heads": spec.heads,
            "cfg": spec.cfg,
            "dtype": str(spec.dtype).removeprefix("torch."),
        })
        self.recording = Recording(spec.device, spec.dtype)
        self.trace = AttentionTrace(self.recording, self.info)
        self.active = False  # hooked layers are observed at this step
        self.keeping = False  # this step is kept (maps, and the denoising when recorded)
        self.candidates: list[LayerInfo] = []
        self.kinds_at: dict[str, tuple[str, ...]] = {}  # layer -> the kinds kept there
        self.kept_steps: set[int] | None = None
        self.estimate: Estimate | None = None  # the whole capture's size, when the step count is known
        self.per_step: int | None = None  # bytes one kept step adds
        self._step_open = False  # a denoiser call is under way (begun, not yet returned)
        self.denoising = DenoisingRecorder(self) if spec.record_latents else None
        self._concept_tokens: torch.Tensor | None = None  # (C, width), made at the first step
        self._row_ids: list[int] = []
        self._rows: dict[tuple, Rows] = {}
        self._head_sel: torch.Tensor | None = None
        self._pending: list[Pending] = []  # this step's captured calls, computed when the denoiser returns
        self._pending_bytes = 0
        self._seen: set[str] = set()  # layers already in info.layers
        self._stores: dict[str, Callable[[torch.Tensor, int], None]] = {}

    # ------------------------------------------------------------------ lifecycle
    def open(self, run: Run) -> None:
        self.candidates = self.spec.candidate_layers(run.layers)  # bad names fail here, before any call
        if self.denoising is not None:
            if getattr(run.pipe, "scheduler", None) is None:
                raise CaptureError("record_latents=True needs a pipeline with a scheduler, not a bare denoiser")
            self.denoising.install(run.pipe.scheduler)

    def layers(self, run: Run) -> list[str]:
        """Resolve the spec against the run (step 0) and check the budget; the layers to hook."""
        spec, info = self.spec, self.info
        info.latent_size, info.image_size = run.latent_size, run.image_size
        self._setup_rows(run)
        self._setup_tokens(run)
        sizes = {i.name: i.map_size(run.latent_size) for i in self.candidates if i.factor is not None}
        self.kinds_at = spec.resolve(self.candidates, sizes)
        chosen = [i for i in self.candidates if i.name in self.kinds_at]
        info.sizes.update({n: sizes[n] for n in self.kinds_at if n in sizes})
        info.heads = {i.name: i.heads for i in chosen}
        if spec.heads == "all":
            info.head_indices = {i.name: list(range(i.heads)) for i in chosen}
        elif spec.heads != "mean":
            for i in chosen:
                spec.heads_kept(i.heads)  # raises for a head the layer does not have
            info.head_indices = {i.name: list(spec.heads) for i in chosen}
            self._head_sel = torch.tensor(spec.heads)
        if spec.steps is not None:
            if run.expected_steps is None:
                if any(s < 0 for s in ([spec.steps] if isinstance(spec.steps, int) else spec.steps)):
                    raise CaptureError("negative step indices need a known number of steps (trace a pipeline)")
                self.kept_steps = set(select_steps(spec.steps, 10**9))
            else:
                self.kept_steps = set(select_steps(spec.steps, run.expected_steps))
        self._check_pag(chosen, run)
        if spec.concepts is not None:
            info.concepts = list(spec.concepts)
            if not any(i.role == "joint" for i in run.layers):
                raise CaptureError("concepts= needs a model with joint attention (SD 3 family: "
                                   "StableDiffusion3Pipeline); this denoiser has none")
        n_steps = len(self.kept_steps) if self.kept_steps is not None else run.expected_steps
        one = self._estimate(chosen, run, 1)
        self.per_step = one.total
        self.estimate = None if n_steps is None else self._estimate(chosen, run, n_steps)
        budget = spec.max_bytes
        if budget is not None:  # before any attention is computed
            if self.estimate is not None and self.estimate.total > budget:
                raise BudgetError(self.estimate.message(budget, spec))
            if self.estimate is None and self.per_step > budget:
                raise BudgetError(one.message(budget, spec))
        if self.estimate is not None:
            self.recording.capacity = self.estimate.steps
        elif budget is not None and self.per_step:  # unknown step count: never allocate past the budget
            self.recording.max_steps = int(budget // self.per_step)
            self.recording.capacity = min(8, self.recording.max_steps)
        names = [i.name for i in chosen]
        if spec.concepts is not None:  # every joint layer carries the concepts, kept or not: hook them all
            names += [i.name for i in run.layers if i.role == "joint" and i.name not in self.kinds_at]
        return names

    def context_tokens(self, run: Run, context: torch.Tensor) -> torch.Tensor | None:
        if self.spec.concepts is None:
            return None
        if self._concept_tokens is None:
            self._concept_tokens = embed_concepts(run.pipe, self.spec.concepts, context.device, context.dtype)
        return self._concept_tokens.expand(context.shape[0], -1, -1)

    def _no_probs(self, kinds: tuple[str, ...]) -> bool:
        """A layer hooked only to carry the concept tokens, or one that keeps only their maps: no probabilities."""
        return self.spec.concepts is not None and set(kinds) <= set(CONCEPT_KINDS)

    def heads_out(self, call: Call, hidden: torch.Tensor):
        kinds = self.kinds_at.get(call.layer.name, ())
        if call.n_concepts and "concept" in kinds:
            self._note(call.layer.name)
            with torch.no_grad():
                scores = concept_scores(hidden, call.n_img_queries, call.n_concepts)  # (b, n, C)
                kept = take(scores, self._kept_rows(call.batch, scores.device))[:, None]  # (rows, 1, n, C)
                self.recording.write("concept", call.layer.name, kept, len(self.info.steps) - 1)
        if call.n_concepts and "concept_image" in kinds and call.concept_inputs is not None:
            self._note(call.layer.name)
            with torch.no_grad():
                probs = concept_probs(call.concept_inputs)[..., : call.n_img_queries]  # (b, heads, C, n)
                rows = rearrange(probs.mean(dim=1), "b c n -> b n c")  # heads averaged, as "concept"
                kept = take(rows, self._kept_rows(call.batch, rows.device))[:, None]  # (rows, 1, n, C)
                self.recording.write("concept_image", call.layer.name, kept, len(self.info.steps) - 1)
        return None

    def _check_pag(self, chosen: list[LayerInfo], run: Run) -> None:
        """PAG replaces some self-attention layers by the identity on its perturbed rows: there is no
        attention map to keep there, so asking for one is an error, not a made-up map."""
        if not any(r.half == "perturbed" for r in self.info.rows):
            return
        current = run.denoiser.attn_processors
        bad = [i.name for i in chosen if "self" in self.kinds_at.get(i.name, ())
               and type(current[f"{i.name}.processor"]).__name__.startswith("PAG")]
        if bad:
            raise CaptureError(
                f"cfg={self.spec.cfg!r} keeps PAG's perturbed rows, whose self-attention in {bad} is replaced by "
                "the identity (no attention map exists there): leave those layers out (self_layers=...), or "
                "keep the other rows (cfg='cond', 'uncond' or 'both')"
            )

    def begin_step(self, run: Run) -> None:
        info = self.info
        keeping = self.kept_steps is None or run.step in self.kept_steps
        if keeping:
            self._check_running_budget()  # before this step computes anything
        self._step_open = True
        info.all_timesteps.append(run.timestep)
        info.num_steps = run.step + 1
        self.active = bool(self.kinds_at) and keeping
        self.keeping = keeping  # the denoising recorder's too
        if keeping:
            info.steps.append(run.step)

    def end_step(self, run: Run) -> None:
        self.flush()
        self._step_open = False

    def close(self, run: Run, error: BaseException | None) -> None:
        info = self.info
        try:
            if self._step_open:  # the denoiser raised mid-call: that step is dropped from every layer
                self._pending.clear()
                if info.steps and info.steps[-1] == run.step:
                    info.steps.pop()
                info.num_steps = run.step
                info.all_timesteps = info.all_timesteps[: run.step]
        finally:  # even a Ctrl-C here leaves a finished recording
            self._pending.clear()
            self._step_open = False
            self.active = False
            if self.denoising is not None:
                self.denoising.uninstall()
            info.all_timesteps = [float(t) for t in info.all_timesteps]  # GPU timesteps read once, here
            self.recording.finish(len(info.steps))
        if error is None:
            self._warn_if_short(run)
            if self.denoising is not None:
                self.denoising.finish(info, run.pipe)

    def _warn_if_short(self, run: Run) -> None:
        """A run that kept no step, or fewer than asked, says so: an empty trace is no answer."""
        info, spec = self.info, self.spec
        if run.step < 0:
            warn("sdlens.trace captured nothing: the traced denoiser was not called inside the `with` block",
                 TraceWarning)
        elif self.kept_steps is not None and not set(self.kept_steps) <= set(info.steps):
            missed = sorted(set(self.kept_steps) - set(info.steps))
            warn(
                f"sdlens.trace kept steps {info.steps} of steps={spec.steps!r}: the run made {info.num_steps} steps"
                f"{f' (it was expected to make {run.expected_steps})' if run.expected_steps else ''}, so steps "
                f"{missed} never came", TraceWarning)

    # ------------------------------------------------------------------ setup
    def _setup_rows(self, run: Run) -> None:
        layout, info, spec = run.layout, self.info, self.spec
        if not layout.cfg and spec.cfg in ("uncond", "both"):
            raise CaptureError(
                f"cfg={spec.cfg!r} needs a classifier-free-guidance batch, but this run has none "
                "(guidance_scale <= 1): use cfg='cond'"
            )
        if not layout.pag and spec.cfg == "perturbed":
            raise CaptureError("cfg='perturbed' keeps the rows of Perturbed-Attention Guidance, which this run "
                               "does not use: use cfg='cond'")
        self._row_ids = layout.indices(CFG_HALVES[spec.cfg])
        info.rows = [layout.rows[i] for i in self._row_ids]
        info.images_per_prompt = layout.images_per_prompt
        info.prompts = list(layout.prompts)
        info.negative_prompts = None if layout.negative_prompts is None else list(layout.negative_prompts)

    def _setup_tokens(self, run: Run) -> None:
        info = self.info
        if not info.prompts:
            return
        if _keys_are_t5(run):  # Flux: the text keys are T5's slots of prompt_2 (default: the prompt)
            given = (run.call or {}).get("prompt_2")
            texts = info.prompts if given is None else ([given] * len(info.prompts) if isinstance(given, str)
                                                        else list(given))
            toks = [tokenize(p, run.pipe.tokenizer_2, max_length=run.context_len) for p in texts]
            info.tokenizations["cond"] = info.tokenizations["cond_2"] = toks  # encoder 2 (prompt_2), as SDXL names it
            return
        # a bare denoiser (prompt= given) has no tokenizer of its own: SD 1.x's CLIP tokenizer ships here
        tokenizer = getattr(run.pipe, "tokenizer", None) or load_clip_tokenizer()
        info.tokenizations["cond"] = [tokenize(p, tokenizer) for p in info.prompts]
        if info.negative_prompts is not None:
            info.tokenizations["uncond"] = [tokenize(p, tokenizer) for p in info.negative_prompts]
        tokenizer_2 = getattr(run.pipe, "tokenizer_2", None)
        if tokenizer_2 is not None:  # SDXL: the second encoder reads prompt_2 (default: the prompt) into the same slots
            call = run.call or {}
            for half, first, second in (("cond", info.prompts, "prompt_2"),
                                        ("uncond", info.negative_prompts, "negative_prompt_2")):
                if first is None:
                    continue
                given = call.get(second)
                texts = first if given is None else ([given] * len(first) if isinstance(given, str) else list(given))
                info.tokenizations[f"{half}_2"] = [tokenize(p, tokenizer_2) for p in texts]
        n_slots = len(info.tokenizations["cond"][0].ids)
        if run.context_len > n_slots:  # SD3: CLIP slots, then T5's
            extra = run.context_len - n_slots
            t5 = getattr(run.pipe, "tokenizer_3", None)
            info.key_labels = [f"<t5:{i}>" for i in range(extra)]
            if t5 is not None and len(info.prompts) == 1:  # labels are shared by all rows: name them for one prompt only
                ids = t5(info.prompts[0], padding="max_length", max_length=extra, truncation=True).input_ids
                info.key_labels = [f"t5:{s}" for s in t5.convert_ids_to_tokens(ids)]

    def _estimate(self, chosen: list[LayerInfo], run: Run, n_steps: int) -> Estimate:
        spec = self.spec
        item = torch.empty((), dtype=spec.dtype).element_size()
        per_layer = {}
        for info in chosen:
            if info.factor is None:
                continue
            h, w = info.map_size(run.latent_size)
            n = h * w
            kinds = set(self.kinds_at.get(info.name, ()))
            t = run.context_len
            per_row_step = (n * t if "cross" in kinds else 0) + (n * n if "self" in kinds else 0) \
                + (t * n if "text_image" in kinds else 0) + (t * t if "text_text" in kinds else 0) \
                + n * len(spec.concepts or ()) * len(kinds & set(CONCEPT_KINDS))
            per_layer[info.name] = n_steps * len(self._row_ids) * spec.heads_kept(info.heads) * per_row_step * item
        return Estimate(total=sum(per_layer.values()), per_layer=per_layer, steps=n_steps)

    def _check_running_budget(self) -> None:
        """With no known step count, each kept step is checked before it runs: the maps never pass the budget."""
        mb = self.spec.max_bytes
        if mb is None or self.estimate is not None or self.per_step is None:
            return
        after = (len(self.info.steps) + 1) * self.per_step
        if after > mb:
            raise BudgetError(
                f"the capture would pass max_bytes={mb} at step {len(self.info.steps)} ({after} bytes with this "
                f"step's maps, {self.per_step} a step); capture fewer layers or steps, or average heads"
            )

    # ------------------------------------------------------------------ named points
    def rows(self, run: Run) -> list[int]:
        return self._row_ids

    def _note(self, layer: str) -> None:
        """Note a layer as captured, in call order (a set: a list scan per call would grow with the model)."""
        if layer not in self._seen:
            self._seen.add(layer)
            self.info.layers.append(layer)

    def qkv(self, call: Call, q, k, v):
        self._note(call.layer.name)
        if call.explicit:  # an editor computes the probabilities: keep those, at the probs point
            return None
        kinds = self.kinds_at.get(call.layer.name, ())
        if self._no_probs(kinds):
            return None
        if call.n_img_queries is not None and not set(TEXT_KINDS) & set(kinds):
            q = q[:, :, : call.n_img_queries]  # a joint layer whose text queries are not kept
        if call.rows is None:  # the whole batch: the kept rows are taken when the step's layers are batched
            rows = self._kept_rows(call.batch, q.device)
        elif call.rows == self._row_ids:
            rows = None
        else:  # recomputed for more rows than this capture keeps
            rows = torch.tensor([call.rows.index(r) for r in self._row_ids], device=q.device)
        self._defer(Pending(self._store_for(call.layer), q, k, call.scale, call.bias, call.n_img_keys, rows))
        return None

    def probs(self, call: Call, p: torch.Tensor):
        if self._no_probs(self.kinds_at.get(call.layer.name, ())):
            return None
        self._note(call.layer.name)
        with torch.no_grad():
            kept = self._reduce_heads(take(p, self._kept_rows(call.batch, p.device)))
            self._store_for(call.layer)(kept, call.n_img_keys)
        return None

    # ------------------------------------------------------------------ holding back, computing, storing
    def _defer(self, item: Pending) -> None:
        self._pending.append(item)
        self._pending_bytes += item.q.numel() * item.q.element_size() + item.k.numel() * item.k.element_size()
        if self._pending_bytes > probs.PENDING_BYTES:  # bounded memory: compute what is held so far
            self.flush()

    def flush(self) -> None:
        """Compute and store the probabilities of the calls held back during this step."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            with torch.no_grad():
                compute_pending(pending, self._reduce_heads, self._heads_kept)

    @property
    def _heads_kept(self) -> int | None:
        """Heads stored per map: 1 (averaged), the chosen ones, or None (all of the layer's)."""
        if self.spec.heads == "mean":
            return 1
        return None if self.spec.heads == "all" else len(self.spec.heads)

    def _kept_rows(self, batch: int, device: torch.device | None = None) -> Rows:
        """The kept rows of a batch of ``batch`` rows: a slice when contiguous, else an index tensor on
        ``device``; cached, so that equal selections are one object and an index moves to the GPU once."""
        key = (batch, device)
        if key not in self._rows:
            ids = self._row_ids if max(self._row_ids, default=-1) < batch else list(range(batch))
            if ids == list(range(ids[0], ids[0] + len(ids))):
                self._rows[key] = slice(ids[0], ids[0] + len(ids))
            else:
                self._rows[key] = torch.tensor(ids, device=device)
        return self._rows[key]

    def _reduce_heads(self, p: torch.Tensor) -> torch.Tensor:
        """``(rows, heads, n, keys)`` → the heads the spec keeps: ``(rows, 1, n, keys)`` for the mean."""
        if self.spec.heads == "mean":
            return p.mean(dim=1, keepdim=True)
        if self._head_sel is not None:
            if self._head_sel.device != p.device:  # moved once, not per call
                self._head_sel = self._head_sel.to(p.device)
            return p.index_select(1, self._head_sel)
        return p

    def _store_for(self, layer: LayerInfo):
        """The function that stores ``layer``'s probabilities ``(rows, heads kept, n, keys)`` of this step."""
        store = self._stores.get(layer.name)
        if store is None:
            kinds = self.kinds_at.get(layer.name, self.spec.kinds)

            def store(p: torch.Tensor, n_img_keys: int) -> None:
                # a joint layer's (rows, heads, queries, keys): image queries first, then the text's (if kept);
                # image keys first, then the text's
                n = n_img_keys
                parts = {"self": p[:, :, :n, :n], "cross": p[:, :, :n, n:], "text_image": p[:, :, n:, :n],
                         "text_text": p[:, :, n:, n:]} if layer.role == "joint" else {layer.role: p}
                if layer.name not in self.info.sizes:
                    self.info.sizes[layer.name] = infer_map_size(min(p.shape[2], n or p.shape[2]),
                                                                 self.info.latent_size)
                for kind, part in parts.items():
                    if kind in kinds:
                        self.recording.write(kind, layer.name, part, len(self.info.steps) - 1)

            self._stores[layer.name] = store
        return store


def _keys_are_t5(run: Run) -> bool:
    """The text keys are the second encoder's (T5's) slots only: Flux (its CLIP gives the pooled vector)."""
    return run.pipe is not None and getattr(run.pipe, "tokenizer_2", None) is not None and is_flux(run.denoiser)


__all__ = ["Capture"]
