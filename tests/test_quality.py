"""benchmarks/quality.py: its measures against independent computations, and a short run on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _load import load_module

from sdlens.world import object_words, parse_caption


@pytest.fixture(scope="module")
def quality():
    return load_module("benchmarks/quality.py")


def test_word_index_points_at_each_objects_words(quality):
    """The word positions the benchmark scores are the caption's colour, shape, position and size words."""
    captions = quality.eval_captions(30, seed=3)
    assert [len(parse_caption(c).objects) for c, _ in captions] == [1] * 30 + [2] * 30
    every_kind = quality.eval_captions(30, seed=3, kinds=tuple(quality.CAPTION_KINDS))
    assert every_kind[:60] == captions  # the default kind's captions come first, as they always did
    for text, _ in every_kind:
        words = text.split()
        scene = parse_caption(text)
        assert {"positioned": scene.positioned, "free": not scene.positioned,
                "sized": all(o.size for o in scene.objects)}[quality.caption_kind(scene)]
        for entry, obj in zip(object_words(text), scene.objects):
            assert words[entry["color"]] == obj.color
            assert words[entry["shape"]] == obj.shape
            assert words[entry["position"]] == obj.position if obj.position else "position" not in entry
            assert words[entry["size"]] == obj.size if obj.size else "size" not in entry
    assert quality.eval_captions(5, seed=3) == quality.eval_captions(5, seed=3)  # held-out and fixed


def test_localisation_matches_a_pixel_by_pixel_count(quality):
    rng = np.random.default_rng(0)
    for _ in range(20):
        heat = torch.from_numpy(rng.random((16, 16)).astype(np.float32)) * 3 + 1  # not in [0, 1]
        mask = rng.random((16, 16)) > 0.6
        got = quality.localisation(heat, mask)
        lo, hi = heat.min().item(), heat.max().item()
        inter = union = 0
        for y in range(16):
            for x in range(16):
                inside = (heat[y, x].item() - lo) / (hi - lo) >= 0.5
                inter += inside and mask[y, x]
                union += inside or mask[y, x]
        assert got["iou"] == pytest.approx(inter / union)
        y, x = divmod(int(heat.argmax()), 16)
        assert got["peak"] == bool(mask[y, x])
    square = torch.zeros(8, 8)
    square[2:5, 2:5] = 1.0
    assert quality.localisation(square, square.numpy() > 0) == {"iou": 1.0, "peak": True}
    assert quality.localisation(square, square.numpy() == 0) == {"iou": 0.0, "peak": False}


@pytest.mark.slow  # 4 s: a short benchmark run
def test_short_run_on_the_shipped_model(quality, tmp_path, capsys):
    """4 + 4 held-out captions through the real script: the summary follows from the per-caption
    records, and the shipped model draws what it is asked (100% / 100% on 120 + 120 captions with positions)."""
    out = tmp_path / "q.json"
    assert quality.main(["--n", "4", "--batch", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| target | value | goal | met |" in printed
    result = json.loads(out.read_text())
    records, summary = result["records"], result["summary"]
    assert [r["n_objects"] for r in records] == [1] * 4 + [2] * 4
    assert [r["caption"] for r in records] == [c for c, _ in quality.eval_captions(4)]
    assert summary["adherence"]["single"] == pytest.approx(np.mean([r["all"] for r in records[:4]]))
    assert summary["adherence"]["two"] == pytest.approx(np.mean([r["all"] for r in records[4:]]))
    for r in records:
        shares = {k: v for k, v in r["slot_mass"].items() if k != "to text"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)  # the softmax's rows sum to 1
        assert r["slot_mass"]["to text"] == pytest.approx(1.0, abs=1e-3) and shares["t5"] == 0  # a UNet: all text
    first = [o for r in records[4:] for o in r["objects"][:1] if o["found"]]
    assert summary["localisation"]["first"]["shape"]["iou"] == pytest.approx(
        np.mean([o["shape"]["iou"] for o in first])
    )
    # a loose floor: the shipped model is far above it on 240 captions
    assert summary["adherence"]["single"] >= 0.75 and summary["adherence"]["two"] >= 0.5
    assert summary["localisation"]["single"]["shape"]["peak"] >= 0.75


@pytest.mark.slow  # 8 s: a short benchmark run on tiny-sd3
def test_short_run_on_tiny_sd3_measures_word_maps_both_ways(quality, tmp_path, capsys):
    """On a joint-attention model every word is measured three ways (image->text, text->image, both),
    and with --concepts its concept maps two ways (output and attention space); each figure the mean
    of the records', and each localisation target is judged per direction."""
    out = tmp_path / "q.json"
    assert quality.main(["--model", "tiny-sd3", "--n", "3", "--concepts", "--json", str(out)]) == 0  # shortcut = trace
    printed = capsys.readouterr().out
    assert "Word maps read both ways" in printed
    result = json.loads(out.read_text())
    records, summary = result["records"], result["summary"]
    singles = [o for r in records for o in r["objects"] if o["group"] == "single" and o["found"]]
    assert singles
    assert "concept tokens' own attention" in printed
    for kind in ("shape", "shape/text_image", "shape/both", "color/both", "position/text_image",
                 "shape concept", "color concept attention"):
        assert summary["localisation"]["single"][kind]["iou"] == pytest.approx(np.mean([o[kind]["iou"] for o in singles]))
    targets = summary["targets"]
    for direction in ("image->text", "text->image", "both"):
        t = targets[f"shape IoU single [{direction}]"]
        assert t["met"] == (t["value"] >= 0.5)
    assert targets["shape IoU single [both]"]["value"] == summary["localisation"]["single"]["shape/both"]["iou"]
    assert "adherence single" in targets and "adherence single [both]" not in targets  # not a map's target
    for r in records:
        assert 0 < r["slot_mass"]["to text"] < 1  # a joint softmax: the text's share of the pixels' attention


def test_localisation_per_caption_kind_splits_the_overall_figures(quality):
    """Per-kind rows are the overall figures restricted to that kind's captions (synthetic records)."""

    def obj(group, peak):
        return {"group": group, "found": True, "color": {"iou": 0.5 * peak, "peak": peak},
                "shape": {"iou": 0.8, "peak": True}}

    def record(kind, objects):
        return {"kind": kind, "n_objects": len(objects), "all": True,
                **{k: True for k in ("color", "shape", "position", "size", "count")},
                "slot_mass": {"start": 0.1, "word": 0.2, "end": 0.1, "pad": 0.6}, "objects": objects}

    records = [
        record("positioned", [obj("single", True)]),
        record("positioned", [obj("first", True), obj("second", True)]),
        record("free", [obj("single", False)]),
        record("free", [obj("first", True), obj("second", False)]),
        record("free", [obj("first", False), obj("second", False)]),
    ]
    for r in records:  # free captions need centres for the grid
        for o in r["objects"]:
            o["centroid"] = [0.5, 0.5]
    summary = quality.summarize(records)
    by_kind = summary["by_kind"]
    for group in ("single", "first", "second"):
        total = summary["localisation"][group]
        parts = [by_kind[k]["localisation"][group] for k in ("positioned", "free")]
        assert sum(p["measured"] for p in parts) == total["measured"]
        peaks = [p["color"]["peak"] * p["color"]["n"] for p in parts]
        assert sum(peaks) == pytest.approx(total["color"]["peak"] * total["color"]["n"])
    assert by_kind["free"]["localisation"]["second"]["color"]["peak"] == 0.0
    assert by_kind["positioned"]["localisation"]["second"]["color"]["peak"] == 1.0
    assert "| free: second | 2 / 2 | 0.00 | 0% |" in quality.markdown(summary)


def test_map_ceiling_is_near_exact_on_cell_aligned_objects_and_limited_on_small_ones():
    """benchmarks/map_ceiling.py: a rectangle on the grid's cell boundaries is drawn by its grid's best
    map but for its rounded corners (bilinear upsampling: IoU 0.95 at 8x8, 0.99 at 16x16); a 3x3-pixel
    dot inside one 8x8 cell cannot be, as the grid blurs it over the cell."""
    ceiling = load_module("benchmarks/map_ceiling.py")
    square = np.zeros((64, 64), dtype=bool)
    square[16:32, 8:40] = True
    coarse, fine = ceiling.ceiling_iou(square, 8), ceiling.ceiling_iou(square, 16)
    assert 0.95 <= coarse < fine <= 1.0
    lost = 1 - coarse  # pixels at the corners whose bilinear value falls under half: 6 a corner
    assert lost * square.sum() == pytest.approx(4 * 6, abs=1)
    dot = np.zeros((64, 64), dtype=bool)
    dot[18:21, 18:21] = True
    coarse, fine = ceiling.ceiling_iou(dot, 8), ceiling.ceiling_iou(dot, 16)
    assert coarse < 0.3 and fine > coarse


@pytest.mark.slow  # 6 s: two images on tiny-sd3
def test_joint_blocks_all_row_is_the_quality_benchmarks_measure(quality, capsys):
    """benchmarks/joint_blocks.py: its all-blocks image->text row is what quality.py's own shortcut
    (PromptMaps, a second implementation) measures on the same images; it prints one row per block."""
    import sdlens
    from sdlens.world import score

    blocks = load_module("benchmarks/joint_blocks.py")
    pipe = sdlens.load_pipeline("tiny-sd3")
    captions = [c for c in quality.eval_captions(2, seed=5) if len(parse_caption(c[0]).objects) == 1][:2]
    got = blocks.measure(pipe, captions, steps=6, guidance=7.0)
    gens = [torch.Generator("cpu").manual_seed(s) for _, s in captions]
    with sdlens.trace(pipe, text_attn=True) as tr:
        images = pipe([c for c, _ in captions], num_inference_steps=6, guidance_scale=7.0, generator=gens,
                      output_type="np").images
    images = (images * 255).round().clip(0, 255).astype(np.uint8)
    expected = {"color": [], "shape": []}
    for i, (text, _) in enumerate(captions):
        scene = parse_caption(text)
        det = next(d for d in score(images[i], scene)["detected"] if d.color == scene.objects[0].color)
        maps = quality.PromptMaps(tr, i, images.shape[1:3])
        for kind in expected:
            expected[kind].append(quality.localisation(maps.word_map(object_words(text)[0][kind]), det.mask))
            assert got["all", "text_image", kind][i] == quality.localisation(
                maps.word_map(object_words(text)[0][kind], "text_image"), det.mask)
    assert got["all", "image_text", "color"] == expected["color"]
    assert got["all", "image_text", "shape"] == expected["shape"]
    assert len({b for b, _, _ in got}) == 1 + 8  # all, and each of tiny-sd3's 8 blocks
    assert blocks.main(["--n", "1", "--steps", "4"]) == 0
    assert capsys.readouterr().out.count("| transformer_blocks.") == 8
