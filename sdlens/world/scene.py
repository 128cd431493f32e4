"""Scenes of the shapes world and the captions that describe them.

A scene is one or two flat-coloured objects on a plain light-grey background. Each object has a
shape and a colour, and may have a position and a size word, all taken from a small vocabulary, so
every caption the world can produce is known exactly and can be parsed back into the scene it came
from:

>>> scene = Scene((Obj("circle", "red", "left"), Obj("square", "blue", "right")))
>>> caption(scene)
'a red circle on the left and a blue square on the right'
>>> parse_caption(caption(scene)) == scene
True
>>> caption(Scene((Obj("triangle", "green", size="small"),)))
'a small green triangle'

What a caption leaves out, the noise decides: an object without a position is drawn anywhere in
the image (``render.place``), an object without a size word at the usual size. Two objects always
have different colours, so a colour names exactly one object; they either both have positions,
opposite ones (left/right or top/bottom), or neither has one; either way they never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WorldError

# Pure, well separated colours (RGB, 0..255). The background is light grey rather than white so that
# yellow stays easy to see; its nearest palette colour (yellow) is still 214 units away.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND: tuple[int, int, int] = (200, 200, 200)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
SIZES: tuple[str, ...] = ("small", "big")  # size words; an object without one has the usual size

# The two pairs of positions a two-object scene may use; the objects of a pair never overlap.
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# How each position is said in a caption: "on the left", "at the top".
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

# Probability that sample_scene(rng) (with n_objects=None) draws a two-object scene.
TWO_OBJECT_PROB = 0.5


def _check_name(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise WorldError(f"unknown {kind} {value!r}; valid {kind}s are: {', '.join(valid)}")


@dataclass(frozen=True)
class Obj:
    """One object of a scene, e.g. ``Obj("circle", "red", "left")`` or ``Obj("square", "blue", size="big")``.

    ``position`` None: the caption leaves the place open; ``size`` None: no size word (the usual size).
    """

    shape: str
    color: str
    position: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.color, list(COLORS))
        if self.position is not None:
            _check_name("position", self.position, POSITIONS)
        if self.size is not None:
            _check_name("size", self.size, SIZES)


@dataclass(frozen=True)
class Scene:
    """One or two objects. Their order is the order the caption mentions them in.

    Two objects must have different colours, and either opposite positions (left/right or
    top/bottom) or no positions at all.
    """

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))  # accept a list, store a tuple
        if not 1 <= len(self.objects) <= 2:
            raise WorldError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2:
            a, b = self.objects
            if a.color == b.color:
                raise WorldError(
                    f"the two objects of a scene must have different colours, both are {a.color}"
                )
            if (a.position is None) != (b.position is None):
                raise WorldError(
                    "either both objects of a scene have a position or neither has, got "
                    f"{a.position} and {b.position}"
                )
            if a.position is not None and OPPOSITE[a.position] != b.position:
                raise WorldError(
                    f"the two objects of a scene must be at opposite positions (left/right or top/bottom), "
                    f"got {a.position} and {b.position}"
                )

    @property
    def positioned(self) -> bool:
        """The caption gives the objects' positions."""
        return self.objects[0].position is not None


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, *, free_prob: float = 0.0, size_prob: float = 0.0
) -> Scene:
    """A random scene. ``n_objects=None`` draws 2 objects with probability TWO_OBJECT_PROB (0.5), else 1.

    Shapes, colours and positions are uniform; two objects get two different colours, a random
    pair of opposite positions (left/right or top/bottom, either order) and independent shapes.
    ``free_prob``: the chance that the scene's caption gives no positions (the renderer then places
    the objects anywhere); ``size_prob``: each object's chance of a size word (small or big, even
    odds). At 0 (the defaults) nothing more is drawn from ``rng``, so seeds give the scenes they did.
    """
    if n_objects is None:
        n_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
    if n_objects not in (1, 2):
        raise WorldError(f"n_objects must be 1, 2 or None, got {n_objects}")
    for name, p in (("free_prob", free_prob), ("size_prob", size_prob)):
        if not 0.0 <= p <= 1.0:
            raise WorldError(f"{name} must be between 0 and 1, got {p}")
    colors = rng.choice(list(COLORS), size=n_objects, replace=False)
    shapes = rng.choice(SHAPES, size=n_objects)
    if n_objects == 1:
        positions = [rng.choice(POSITIONS)]
    else:
        pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
        positions = list(pair) if rng.random() < 0.5 else list(reversed(pair))
    if free_prob > 0 and rng.random() < free_prob:
        positions = [None] * n_objects
    sizes = [None] * n_objects
    if size_prob > 0:
        sizes = [str(rng.choice(SIZES)) if rng.random() < size_prob else None for _ in range(n_objects)]
    return Scene(tuple(
        Obj(str(s), str(c), None if p is None else str(p), z) for s, c, p, z in zip(shapes, colors, positions, sizes)
    ))


def caption(scene: Scene) -> str:
    """The scene in words: ``"a red circle on the left and a blue square on the right"``, ``"a big red circle"``."""
    return " and ".join(
        " ".join(["a", *([o.size] if o.size else []), o.color, o.shape,
                  *([POSITION_PHRASES[o.position]] if o.position else [])])
        for o in scene.objects
    )


_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}
_GRAMMAR = ("'a [small | big] <colour> <shape> [on the left | on the right | at the top | at the bottom]', "
            "joined by ' and '")


def _parse_object(words: list[str], text: str) -> Obj:
    """``["a", "small", "red", "circle", "on", "the", "left"]`` → ``Obj("circle", "red", "left", "small")``."""
    size = words[1] if len(words) > 1 and words[1] in SIZES else None
    rest = words[2 if size else 1 :]
    if not words or words[0] != "a" or len(rest) not in (2, 5):
        raise WorldError(f"cannot parse {' '.join(words)!r} in caption {text!r}: expected {_GRAMMAR}")
    color, shape, *place = rest
    _check_name("colour", color, list(COLORS))
    _check_name("shape", shape, SHAPES)
    if not place:
        return Obj(shape, color, None, size)
    phrase = " ".join(place)
    if phrase not in _PHRASE_TO_POSITION:
        raise WorldError(
            f"unknown position phrase {phrase!r} in caption {text!r}; valid phrases are: "
            f"{', '.join(_PHRASE_TO_POSITION)}"
        )
    return Obj(shape, color, _PHRASE_TO_POSITION[phrase], size)


def parse_caption(text: str) -> Scene:
    """The inverse of :func:`caption`. Case and extra spaces are ignored; a final full stop is allowed.

    Raises ValueError naming the word that is wrong and the valid vocabulary.
    """
    words = text.strip().lower().removesuffix(".").split()
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "and":
            parts.append([])
        else:
            parts[-1].append(word)
    if len(parts) > 2:
        raise WorldError(f"a caption describes 1 or 2 objects, {text!r} has {len(parts)}")
    return Scene(tuple(_parse_object(part, text) for part in parts))


def object_words(text: str) -> list[dict[str, int]]:
    """Per object of a caption, the index in ``text.split()`` of its colour, shape, position and size
    word (for a position, the last word of "on the left"; position and size only where the caption
    has them): ``"a big red circle on the left"`` → ``[{"size": 1, "color": 2, "shape": 3, "position": 6}]``."""
    out, start = [], 0
    for obj in parse_caption(text).objects:
        i = start + 1 + (obj.size is not None)  # after "a" and the size word
        entry = {"color": i, "shape": i + 1}
        if obj.size is not None:
            entry["size"] = i - 1
        end = i + 2
        if obj.position is not None:
            entry["position"] = i + 4
            end = i + 5
        out.append(entry)
        start = end + 1  # past "and"
    return out
