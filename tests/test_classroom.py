"""The exercises' checks and hints: right answers pass, wrong ones fail with the true answer, and
every exercise of the lessons has a check or a hint."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

import sdlens
from sdlens import classroom

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def tiny():
    return sdlens.load_pipeline("tiny")


def test_checks_compute_the_answer_and_say_why(tiny):
    right = classroom.check_slots("a red circle", 5, tiny.tokenizer)
    wrong = classroom.check_slots("a red circle", 4, tiny.tokenizer)
    assert right.right and wrong.right is False and "5 slots" in wrong.message
    assert classroom.check_slots("a red circle", None).right is None
    assert classroom.check_guidance_batch(tiny, 1).right and not classroom.check_guidance_batch(tiny, 2).right
    assert classroom.check_scale(tiny, "Sharper ").right and classroom.check_scale(tiny, "flatter").right is False


def test_joint_tokens_count_patches_and_text():
    pipe3 = sdlens.load_pipeline("tiny-sd3")
    n = classroom.joint_tokens(pipe3)
    assert n == (16 // 2) ** 2 + pipe3.tokenizer.model_max_length + 256
    assert classroom.check_joint_tokens(pipe3, n, 4429, 4429 ** 2).right
    assert classroom.check_joint_tokens(pipe3, n, 4096, 4096 ** 2).right is False
    assert classroom.check_joint_tokens(pipe3, n, None, None).right is None


def test_every_exercise_has_a_check_or_a_hint():
    checks = {"01.4", "04.1", "04.3", "04.6"}
    for name in sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb")):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4)
        text = next(c.source for c in nb.cells if c.cell_type == "markdown" and "## Exercises" in c.source)
        numbers = re.findall(r"^(\d+)\. ", text.split("## Exercises")[1], re.M)
        assert numbers, name
        for n in numbers:
            key = f"{name[:2]}.{n}"
            assert key in checks or key in classroom.HINTS, key
    with pytest.raises(KeyError, match="exercises with hints"):
        classroom.hint("09.1")

