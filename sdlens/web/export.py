"""``sdlens web``: the built-in model as a static web page that runs it in the browser.

What the page gets, all in one folder (no network needed once written):

- ``text_encoder.onnx``: token ids ``(b, 77)`` → the prompt's slot vectors ``(b, 77, width)``;
- ``unet.onnx``: ``(sample (b, 4, h, w), timestep (1,), context (b, 77, width))`` → the noise
  estimate ``eps`` and, for the batch's last row (the conditional one, as the pipeline orders a
  CFG batch), each cross-attention layer's probabilities averaged over heads: ``maps_<i>`` of
  shape ``(h·w, 77)``, in the layers' call order;
- ``vae_decoder.onnx``: latents ``(b, 4, h, w)`` → pictures ``(b, 3, H, W)`` in [0, 1];
- ``model.json``: the vocabulary (the world's words and their CLIP token ids), the special ids,
  the sampler's coefficients for every step count (``web.schedule``), the map groups (size and
  number of layers), the defaults;
- ``noise.bin``: the initial noise of seeds ``0 … seeds-1``, float32, exactly what
  ``torch.Generator().manual_seed(seed)`` draws for the pipeline (so a seed gives the same
  picture as in Python);
- the page (``index.html``, ``app.js``, ``worker.js``, ``style.css``) and onnxruntime-web's
  files (vendored in ``sdlens/web/vendor``; see its README).

Every attention runs as an explicit softmax in the graphs (the probabilities are outputs), in
float32; weights are stored as float16 and cast to float32 when the graph starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import WebError
from ..files import staged_folder
from ..hooks.attention import sdpa_inputs, sdpa_output
from ..hooks.layers import vae_factor

HERE = Path(__file__).resolve().parent
PAGE = HERE / "page"
VENDOR = HERE / "vendor"
PAGE_FILES = ("index.html", "app.js", "worker.js", "style.css")
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", "LICENSE")
MAX_STEPS = 50
OPSET = 17


class _ExplicitAttention:
    """An attention processor for export: diffusers' ``AttnProcessor2_0`` (the hooks' two halves of it)
    with ``softmax(q·kᵀ/√d)·v`` as plain ops in the middle. A cross-attention layer appends its
    head-averaged probabilities of the batch's last row to ``store``."""

    def __init__(self, store: list | None) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        inputs = sdpa_inputs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        q, k = inputs.query, inputs.key  # (b, heads, n, d), (b, heads, keys, d)
        p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # (b, heads, n, keys)
        if self.store is not None:
            self.store.append(p[-1].mean(0))  # (n, keys): the last row, heads averaged
        return sdpa_output(attn, p @ inputs.value, inputs)


class _UNetWithMaps(torch.nn.Module):
    """The UNet, returning the noise estimate and each cross-attention layer's head-averaged map."""

    def __init__(self, unet) -> None:
        super().__init__()
        from ..hooks.layers import attention_layers

        self.unet = unet
        self.store: list = []
        procs = {}
        for info in attention_layers(unet):
            procs[f"{info.name}.processor"] = _ExplicitAttention(self.store if info.role == "cross" else None)
        unet.set_attn_processor(procs)

    def forward(self, sample, timestep, context):
        self.store.clear()
        eps = self.unet(sample, timestep, encoder_hidden_states=context).sample
        return (eps, *self.store)


class _TextEncoder(torch.nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids):
        return self.encoder(ids)[0]


class _Decoder(torch.nn.Module):
    """Latents → pictures in [0, 1], as the pipeline's decode and post-processing give them."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)


def _half_weights(path: Path, min_elements: int = 64) -> None:
    """Store a graph's float32 weights as float16, each cast back to float32 when the graph starts
    (half the download; the arithmetic stays float32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__f16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=f"{init.name}__cast"))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(path))


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    _half_weights(path)


def vocabulary(tokenizer) -> dict[str, list[int]]:
    """The world's words (and the punctuation CLIP splits off) with their token ids."""
    from ..world.data import VOCAB_WORDS

    words = list(VOCAB_WORDS) + [",", "."]
    return {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}


def model_files(pipe, tmp: Path, *, seeds: int = 1000, max_steps: int = MAX_STEPS) -> list[str]:
    """Write the model's files for the page into ``tmp``; returns their names."""
    import copy

    from ..hooks.layers import attention_layers
    from .schedule import coefficients

    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    slots = pipe.tokenizer.model_max_length
    width = text.config.hidden_size
    cross = [i for i in attention_layers(unet) if i.role == "cross"]  # in call order, as the store fills
    sizes = [i.map_size(latent[1:]) for i in cross]
    out_names = [f"maps_{i}" for i in range(len(cross))]

    unet = copy.deepcopy(unet).float().eval()
    _export(_UNetWithMaps(unet), (torch.randn(2, *latent), torch.tensor([500.0]), torch.randn(2, slots, width)),
            tmp / "unet.onnx", ["sample", "timestep", "context"], ["eps", *out_names],
            {"sample": {0: "batch"}, "context": {0: "batch"}, "eps": {0: "batch"}})
    _export(_TextEncoder(copy.deepcopy(text).float().eval()), (torch.zeros(2, slots, dtype=torch.long),),
            tmp / "text_encoder.onnx", ["ids"], ["context"], {"ids": {0: "batch"}, "context": {0: "batch"}})
    _export(_Decoder(copy.deepcopy(vae).float().eval()), (torch.randn(1, *latent),), tmp / "vae_decoder.onnx",
            ["latents"], ["image"], {"latents": {0: "batch"}, "image": {0: "batch"}})

    noise = np.stack([torch.randn((1, *latent), generator=torch.Generator().manual_seed(s)).numpy()[0]
                      for s in range(seeds)]).astype("<f4")  # what the pipeline draws for one image
    (tmp / "noise.bin").write_bytes(noise.tobytes())

    tok = pipe.tokenizer
    scale = vae_factor(pipe)
    meta = {
        "format": 1,
        "model": "tiny",
        "latent": list(latent),
        "image": [latent[1] * scale, latent[2] * scale],
        "slots": slots,
        "ids": {"start": tok.bos_token_id, "end": tok.eos_token_id, "pad": tok.pad_token_id},
        "vocabulary": vocabulary(tok),
        "mapGroups": [{"output": name, "layer": info.name, "size": list(size), "layers": 1}
                      for name, info, size in zip(out_names, cross, sizes)],
        "schedules": {str(n): coefficients(copy.deepcopy(pipe.scheduler), n) for n in range(1, max_steps + 1)},
        "defaults": {"steps": 25, "guidance": 7.5, "seed": 0},
        "noise": {"file": "noise.bin", "seeds": seeds, "dtype": "float32"},
    }
    (tmp / "model.json").write_text(json.dumps(meta))
    return ["unet.onnx", "text_encoder.onnx", "vae_decoder.onnx", "noise.bin", "model.json"]


def write_page(out, *, model: str = "tiny", seeds: int = 1000, pipe=None) -> Path:
    """``sdlens web --out DIR``: the page, its scripts, onnxruntime-web and the exported model in ``DIR``.

    Written into a temporary folder beside ``DIR`` first and moved in at the end: a failure leaves
    ``DIR`` as it was.
    """
    from ..models.load import load_pipeline

    if model != "tiny":
        raise WebError(f"--model {model!r}: the web page runs the built-in UNet model only; valid: 'tiny'")
    if not 1 <= seeds <= 100_000:
        raise WebError(f"--seeds {seeds}: give 1 to 100000 (the page ships the noise of seeds 0 … seeds-1)")
    missing = [f for f in ORT_FILES if not (VENDOR / f).is_file()]
    if missing:
        raise FileNotFoundError(f"onnxruntime-web's files {missing} are missing from {VENDOR} (see its README)")
    pipe = pipe if pipe is not None else load_pipeline(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WebError(f"--out {str(out)!r} is a file, not a folder")
    with staged_folder(out, prefix=".sdlens-web-") as (tmp, names):
        names += model_files(pipe, tmp, seeds=seeds)
        for name in PAGE_FILES:
            shutil.copyfile(PAGE / name, tmp / name)
            names.append(name)
        for name in ORT_FILES:
            target = "ort-LICENSE.txt" if name == "LICENSE" else name
            shutil.copyfile(VENDOR / name, tmp / target)
            names.append(target)
    return out


__all__ = ["model_files", "vocabulary", "write_page"]
