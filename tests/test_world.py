"""The shapes world: scenes and captions, the two renderers, the analyzer and training batches."""

from __future__ import annotations

import doctest
import importlib
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdlens.errors import WorldError
from sdlens.world import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    VOCAB_WORDS,
    Obj,
    Scene,
    analyze,
    caption,
    draw_batch,
    parse_caption,
    render,
    render_batch,
    sample_batch,
    sample_scene,
    score,
)
from sdlens.world.analyze import connected_components, position_of, segment, to_rgb
from sdlens.world.scene import OPPOSITE, SIZES


def all_scenes() -> list[Scene]:
    """Every valid scene: 180 with one object, 3888 with two at positions, 972 with two placed freely."""
    places = [*POSITIONS, None]
    singles = [Scene((Obj(s, c, p, z),)) for s, c, p, z in itertools.product(SHAPES, COLORS, places, SIZE_WORDS)]
    pairs = [
        Scene((Obj(s1, c1, p, z1), Obj(s2, c2, None if p is None else OPPOSITE[p], z2)))
        for s1, s2 in itertools.product(SHAPES, SHAPES)
        for c1, c2 in itertools.permutations(COLORS, 2)
        for p in places
        for z1, z2 in itertools.product(SIZE_WORDS, SIZE_WORDS)
    ]
    return singles + pairs


SIZE_WORDS = (None, *SIZES)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(H, W) bool → the (x, y) centre of its pixels in unit coordinates."""
    rows, cols = np.nonzero(mask)
    return (cols.mean() + 0.5) / mask.shape[1], (rows.mean() + 0.5) / mask.shape[0]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] → (H, W, 3) uint8."""
    return ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def blur_and_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A light [1, 2, 1]/4 binomial blur, then Gaussian noise of std sigma: (N, 3, H, W) → same."""
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return blurred + sigma * torch.randn(blurred.shape, generator=generator)


# --- vocabulary, captions, parsing ----------------------------------------------------------------


def test_palette_is_well_separated():
    palette = np.array([BACKGROUND, *COLORS.values()], dtype=float)
    distances = np.linalg.norm(palette[:, None] - palette[None, :], axis=-1)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 200
    assert set(COLORS) == {"red", "green", "blue", "yellow"}
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == ("left", "right", "top", "bottom")


@pytest.mark.parametrize(
    "objects, text",
    [
        ([("circle", "red", "left")], "a red circle on the left"),
        ([("square", "blue", "top")], "a blue square at the top"),
        ([("triangle", "green", "bottom")], "a green triangle at the bottom"),
        (
            [("circle", "red", "left"), ("square", "blue", "right")],
            "a red circle on the left and a blue square on the right",
        ),
    ],
)
def test_caption_examples(objects, text):
    scene = Scene(tuple(Obj(*o) for o in objects))
    assert caption(scene) == text
    assert parse_caption(text) == scene


def test_parse_inverts_caption_for_every_scene_and_vocab_covers_every_word():
    scenes = all_scenes()
    assert len(scenes) == 180 + 3888 + 972
    plain = [s for s in scenes if s.positioned and not any(o.size for o in s.objects)]
    assert len(plain) == 48 + 432  # the captions with positions and no size words
    words = set()
    for scene in scenes:
        text = caption(scene)
        assert parse_caption(text) == scene
        words.update(text.split())
    assert words == set(VOCAB_WORDS)
    assert len(VOCAB_WORDS) == len(set(VOCAB_WORDS))


def test_parse_is_lenient_about_case_spaces_and_full_stop():
    assert parse_caption("  A Red  circle on the LEFT. ") == parse_caption("a red circle on the left")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("a purple circle on the left", ["unknown colour 'purple'", "red, green, blue, yellow"]),
        ("a red hexagon on the left", ["unknown shape 'hexagon'", "circle, square, triangle"]),
        (
            "a red circle in the middle",
            ["unknown position phrase 'in the middle'", "on the left", "at the top"],
        ),
        ("red circle on the left", ["cannot parse", "expected"]),
        ("", ["cannot parse"]),
        ("a red circle on the left and a red square on the right", ["different colours"]),
        ("a red circle on the left and a blue square at the top", ["opposite positions", "left/right"]),
        (
            "a red circle on the left and a blue square on the right and a green circle at the top",
            ["1 or 2 objects"],
        ),
    ],
)
def test_parse_errors_name_the_problem_and_the_vocabulary(text, fragments):
    with pytest.raises(WorldError) as info:
        parse_caption(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_objects_and_scenes_validate_themselves():
    with pytest.raises(WorldError, match="valid shapes are: circle, square, triangle"):
        Obj("hexagon", "red", "left")
    with pytest.raises(WorldError, match="valid positions are"):
        Obj("circle", "red", "middle")
    with pytest.raises(WorldError, match="1 or 2 objects"):
        Scene(())
    assert Scene([Obj("circle", "red", "left")]).objects == (Obj("circle", "red", "left"),)  # list → tuple


def test_sample_scene():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    two = sum(len(s.objects) == 2 for s in scenes)
    assert 150 < two < 250  # n_objects=None: two objects with probability 0.5
    assert all(len(sample_scene(rng, n_objects=1).objects) == 1 for _ in range(20))
    assert all(len(sample_scene(rng, n_objects=2).objects) == 2 for _ in range(20))
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.position for s in scenes for o in s.objects} == set(POSITIONS)
    assert sample_scene(np.random.default_rng(3)) == sample_scene(np.random.default_rng(3))
    with pytest.raises(WorldError, match="n_objects"):
        sample_scene(rng, n_objects=3)


# --- rendering -------------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_jitters():
    scene = parse_caption("a red circle on the left and a blue triangle on the right")
    a, b, c = render(scene, seed=1), render(scene, seed=1), render(scene, seed=2)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert a.masks.shape == (2, 64, 64) and a.masks.dtype == bool
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, c.image)
    assert render(scene, size=32).image.shape == (32, 32, 3)


def test_masks_match_the_colours_in_the_image_and_objects_stay_apart():
    for i, scene in enumerate(all_scenes()[::4]):
        r = render(scene, seed=i)
        nearest = segment(r.image.astype(float))  # (H, W), 0 = background, k = k-th colour
        for obj, mask, place in zip(scene.objects, r.masks, r.placements):
            color_index = 1 + list(COLORS).index(obj.color)
            assert (nearest[mask] == color_index).all()
            radius = place.r * 64  # pixels
            area = {"circle": np.pi, "square": 4.0, "triangle": 2.0}[obj.shape] * radius**2
            assert abs(mask.sum() - area) <= 4 * radius + 1  # at most about one row and one column of pixels
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            assert obj.position is None or position_of(*centroid(mask)) == obj.position
        assert (nearest[~r.masks.any(0)] == 0).all()  # everything else is background
        if len(scene.objects) == 2:
            grown = F.max_pool2d(torch.from_numpy(r.masks[:1]).float(), 5, stride=1, padding=2).bool().numpy()
            assert not (grown & r.masks[1:]).any()  # at least 2 pixels between the objects


def test_render_batch_draws_what_render_draws():
    scenes = all_scenes()[::3]
    renderings = [render(scene, seed=i) for i, scene in enumerate(scenes)]
    centers = torch.zeros(len(scenes), 2, 2)
    radii = torch.zeros(len(scenes), 2)
    for i, r in enumerate(renderings):
        for k, p in enumerate(r.placements):
            centers[i, k] = torch.tensor([p.x, p.y])
            radii[i, k] = p.r
    images, masks = draw_batch(scenes, centers, radii)
    for i, r in enumerate(renderings):
        n = len(r.scene.objects)
        assert (masks[i, :n].numpy() != r.masks).sum() <= 1  # float32 vs float64 at an exact edge
        assert not masks[i, n:].any()
        assert np.abs(to_uint8(images[i]).astype(int) - r.image).max() <= 1


def test_render_batch_shapes_range_determinism_and_positions():
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(64)]
    images, masks = render_batch(scenes, generator=torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert masks.shape == (64, 2, 64, 64) and masks.dtype == torch.bool
    assert images.min() >= -1 and images.max() <= 1
    again, _ = render_batch(scenes, generator=torch.Generator().manual_seed(0))
    other, _ = render_batch(scenes, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, again) and not torch.equal(images, other)
    for scene, m in zip(scenes, masks):
        assert not m[len(scene.objects) :].any()
        for obj, mask in zip(scene.objects, m):
            assert position_of(*centroid(mask.numpy())) == obj.position
    assert render_batch(scenes[:3], size=32)[0].shape == (3, 3, 32, 32)


# --- the analyzer ----------------------------------------------------------------------------------


def test_analyzer_reads_clean_renders():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    correct = 0
    for i, scene in enumerate(scenes):
        r = render(scene, seed=i)
        result = score(r.image, caption(scene))
        correct += result["all"]
        if result["all"]:  # the detected masks are the true masks
            for obj, mask in zip(result["objects"], r.masks):
                iou = (obj["detected"].mask & mask).sum() / (obj["detected"].mask | mask).sum()
                assert iou > 0.9
    assert correct / len(scenes) >= 0.99


def test_analyzer_reads_batch_renders_clean_and_noisy():
    images, captions, _, _ = sample_batch(400, generator=torch.Generator().manual_seed(1))
    noisy = blur_and_noise(images, sigma=0.05, generator=torch.Generator().manual_seed(2))
    clean_accuracy = np.mean([score(image, text)["all"] for image, text in zip(images, captions)])
    noisy_accuracy = np.mean([score(image, text)["all"] for image, text in zip(noisy, captions)])
    assert clean_accuracy >= 0.99 and noisy_accuracy >= 0.99


def _wrong_captions(scene: Scene) -> dict[str, Scene]:
    """One scene per kind of mistake: a changed colour, shape, position, and (two objects) swapped colours."""
    first, *rest = scene.objects
    used = {o.color for o in scene.objects}
    new_color = next(c for c in COLORS if c not in used)
    new_shape = next(s for s in SHAPES if s != first.shape)
    wrong = {
        "color": Scene((Obj(first.shape, new_color, first.position), *rest)),
        "shape": Scene((Obj(new_shape, first.color, first.position), *rest)),
    }
    if rest:
        (second,) = rest
        wrong["position"] = Scene(
            (Obj(first.shape, first.color, second.position), Obj(second.shape, second.color, first.position))
        )
        wrong["swapped colours"] = Scene(
            (Obj(first.shape, second.color, first.position), Obj(second.shape, first.color, second.position))
        )
    else:
        wrong["position"] = Scene(
            (Obj(first.shape, first.color, next(p for p in POSITIONS if p != first.position)),)
        )
    return wrong


def test_wrong_captions_are_scored_wrong():
    rng = np.random.default_rng(5)
    for i in range(300):
        scene = sample_scene(rng)
        image = render(scene, seed=i).image
        if not score(image, scene)["all"]:
            continue
        for kind, wrong in _wrong_captions(scene).items():
            result = score(image, caption(wrong))
            assert not result["all"], (caption(scene), kind, caption(wrong))
            if kind in ("color", "shape", "position"):
                assert not result[kind], (caption(scene), kind, caption(wrong))


def test_score_reports_missing_and_extra_objects():
    two = render(parse_caption("a red circle on the left and a blue square on the right")).image
    result = score(two, "a red circle on the left")
    assert result["color"] and result["shape"] and result["position"]
    assert not result["count"] and not result["all"]
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    result = score(blank, "a red circle on the left")
    assert result["objects"][0]["detected"] is None and not any(result[k] for k in ("color", "shape", "all"))


def test_analyzer_input_formats():
    r = render(parse_caption("a yellow triangle at the top and a green circle at the bottom"), seed=3)
    as_float = torch.from_numpy(r.image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    expected = [("yellow", "triangle", "top"), ("green", "circle", "bottom")]
    for image in (r.image, as_float, as_float.numpy(), torch.from_numpy(r.image)):
        assert sorted((d.color, d.shape, d.position) for d in analyze(image)) == sorted(expected)
    np.testing.assert_allclose(to_rgb(as_float), r.image, atol=1e-3)
    with pytest.raises(WorldError, match=r"uint8 \(H, W, 3\) image, a float \(H, W, 3\) image in 0..1 or a float \(3, H, W\)"):
        analyze(np.zeros((64, 64), dtype=np.float32))


def test_connected_components_and_tiny_blobs():
    labels = np.zeros((8, 8), dtype=int)
    labels[1:3, 1:3] = 1  # a blob
    labels[3:5, 3:5] = 1  # same colour, touching the first only at a corner: separate
    labels[5:7, 0:2] = 2  # another colour
    labels[6, 2:5] = 2  # joined to it
    ids = connected_components(labels)
    regions = {int(i) for i in np.unique(ids[labels > 0])}
    assert len(regions) == 3
    assert len(np.unique(ids[labels == 2])) == 1
    image = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    image[10:13, 10:13] = COLORS["red"]  # 9 pixels < 1% of the image: noise
    assert analyze(image) == []


def test_sample_batch():
    generator = torch.Generator().manual_seed(0)
    images, captions, scenes, masks = sample_batch(32, generator=generator)
    assert images.shape == (32, 3, 64, 64) and masks.shape == (32, 2, 64, 64)
    assert [parse_caption(c) for c in captions] == scenes
    again = sample_batch(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again[0]) and captions == again[1]
    assert all(len(s.objects) == 1 for s in sample_batch(16, two_object_prob=0.0)[2])
    assert all(len(s.objects) == 2 for s in sample_batch(16, two_object_prob=1.0)[2])


@pytest.mark.parametrize(
    "name", ["sdlens.world", *(f"sdlens.world.{m}" for m in ("scene", "render", "analyze", "data"))]
)
def test_docstring_examples(name):
    # importlib, because sdlens.world.render and sdlens.world.analyze are also the names of functions
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0


# --- captions that leave the place to the noise, and size words -------------------------------------


def test_every_caption_kind_round_trips_and_renders_as_its_caption_says():
    for i, scene in enumerate(all_scenes()[::7]):  # every kind, a seventh of them
        text = caption(scene)
        assert parse_caption(text) == scene
        rendering = render(scene, seed=i)
        assert score(rendering.image, scene)["all"], text
        if len(scene.objects) == 2:
            assert not (rendering.masks[0] & rendering.masks[1]).any()


def test_objects_without_a_position_cover_the_image():
    """Centres of position-free objects spread over a 3×3 grid: every cell gets some, none a third.

    A fixed seed and loose bounds (uniform would give each cell 1/9 of the centres, minus the border
    cells' margin)."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, free_prob=1.0) for _ in range(600)]
    images, masks = render_batch(scenes, generator=torch.Generator().manual_seed(0))
    cells = np.zeros((3, 3))
    for scene, mask in zip(scenes, masks):
        for m in mask[: len(scene.objects)]:
            x, y = centroid(m.numpy())
            cells[min(int(y * 3), 2), min(int(x * 3), 2)] += 1
    share = cells / cells.sum()
    assert share.min() > 0.04 and share.max() < 1 / 3, share.round(3)
    assert not (masks[:, 0] & masks[:, 1]).any()  # two free objects never overlap


def test_size_words_order_the_objects_areas():
    rng = np.random.default_rng(1)
    areas: dict = {"small": [], None: [], "big": []}
    shapes_drawn = []
    for i in range(300):
        base = sample_scene(rng, n_objects=1, free_prob=0.5)
        obj = base.objects[0]
        shapes_drawn.append(obj.shape)
        for size in areas:
            scene = Scene((Obj(obj.shape, obj.color, obj.position, size),))
            areas[size].append(render(scene, seed=i).masks[0].sum())
    small, usual, big = (np.array(areas[k]) for k in ("small", None, "big"))
    assert (small < usual).all() and (usual < big).all()  # same seed: the same shape, drawn smaller or bigger
    # and the ranges do not meet: every small object is smaller than any usual one of its shape, and so on
    ratio = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
    shapes = np.array([ratio[s] for s in shapes_drawn])
    side = {k: np.sqrt(v / shapes) for k, v in (("small", small), (None, usual), ("big", big))}  # ~ 2r·64/2
    assert side["small"].max() < side[None].min() and side[None].max() < side["big"].min()


def test_score_judges_size_words_and_leaves_open_positions_unjudged():
    image = render(parse_caption("a big red circle on the left"), seed=0).image
    assert score(image, "a big red circle")["all"]  # no position in the caption: not judged
    assert score(image, "a red circle on the left")["all"]  # no size word: not judged
    wrong = score(image, "a small red circle on the left")
    assert not wrong["all"] and not wrong["size"] and wrong["position"]
    assert not score(image, "a big red circle on the right")["position"]


def test_a_scene_gives_positions_to_both_objects_or_to_neither():
    with pytest.raises(WorldError, match="both objects"):
        Scene((Obj("circle", "red", "left"), Obj("square", "blue")))
    with pytest.raises(WorldError, match="unknown size 'huge'"):
        Obj("circle", "red", size="huge")
    with pytest.raises(WorldError, match="free_prob"):
        sample_scene(np.random.default_rng(0), free_prob=2.0)


def test_a_pipelines_float_output_reads_as_its_uint8_image():
    """output_type='np' gives float (H, W, 3) in 0..1: the analyzer reads it as the uint8 image it
    would be saved as; a float image outside 0..1 is refused, naming the range it has."""
    from sdlens.world import describe, mask_iou, object_mask

    scene = render(parse_caption("a red circle on the left and a blue square on the right"), size=64, seed=4)
    blurred = (scene.image.astype(np.float64) * 0.9 + 12.7) / 255.0  # not whole uint8 steps
    as_saved = (blurred * 255).round().astype(np.uint8)
    assert [(d.color, d.shape, d.area) for d in analyze(blurred)] == [(d.color, d.shape, d.area) for d in analyze(as_saved)]
    assert describe(blurred) == describe(as_saved) and sorted(describe(blurred).split(", ")) == ["blue square", "red circle"]
    red = object_mask(blurred, "red")
    assert mask_iou(red, scene.masks[0]) == 1.0 and mask_iou(red, scene.masks[1]) == 0.0
    assert object_mask(blurred, "green") is None and mask_iou(None, red) == 0.0
    assert describe(np.full((64, 64, 3), 0.78)) == "no object found"
    with pytest.raises(WorldError, match=r"0\.\.1.*spans -0\.90\.\.0\.90"):
        analyze(blurred * 2 - 1)
