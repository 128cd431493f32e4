"""sdlens sweep / report: items, resumable shards, a corrupted shard redone, settings refused, one
process and two (accelerate launch) giving the same records, a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sdlens
from sdlens.sweep import SweepError, assign, load, read_items, run_sweep

PROMPTS = ["a red circle on the left", "a blue square", "a green triangle at the top and a yellow circle at the bottom"]
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 7.5, "map_size": 8, "layers": None, "model": "tiny"}


@pytest.fixture(scope="module")
def pipe():
    p = sdlens.load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n")
    return path


def without_rank(records):
    return [{k: v for k, v in r.items() if k != "rank"} for r in records]


def made_again(pipe, prompt, seed=0):
    """What a sweep makes of one item (its prompt alone in a batch, its seed), made again here: trace and image."""
    with sdlens.trace(pipe) as tr:
        out = pipe([prompt], num_inference_steps=SETTINGS["num_inference_steps"],
                   guidance_scale=SETTINGS["guidance_scale"], generator=[torch.Generator("cpu").manual_seed(seed)],
                   output_type="np")
    return tr, (np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8)[0]


def upper_half(heat: torch.Tensor) -> np.ndarray:
    """Where the map is at least halfway from its least to its largest value."""
    h = heat.float().numpy()
    return (h - h.min()) / (h.max() - h.min()) >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def save_mask(mask: np.ndarray, path: Path) -> str:
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path.name


def test_items_from_text_and_jsonl(tmp_path, prompt_file):
    items = read_items(prompt_file, seeds=2)
    assert [i.id for i in items] == ["000000-s0", "000000-s1", "000001-s0", "000001-s1", "000002-s0", "000002-s1"]
    assert [[i.id for i in b] for b in assign(items, 1, 2)] == [["000000-s1"], ["000001-s1"], ["000002-s1"]]
    assert [[i.id for i in b] for b in assign(items, 1, 2, batch_size=2)] == [["000001-s0", "000001-s1"]]
    mask = tmp_path / "m.png"
    from PIL import Image

    Image.new("L", (64, 64)).save(mask)
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a red circle", "seed": 7, "masks": {"circle": "m.png"}}) + "\n"
                 + json.dumps({"prompt": "a blue square", "negative_prompt": "red"}) + "\n")
    items = read_items(j, seeds=2)
    assert [(i.id, i.seed) for i in items] == [("000000-s7", 7), ("000001-s0", 0), ("000001-s1", 1)]
    assert items[0].masks == {"circle": str(mask.resolve())} and items[1].negative_prompt == "red"


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not JSON"),
    (json.dumps({"text": "a red circle"}), "non-empty \"prompt\""),
    (json.dumps({"prompt": "a red circle", "colour": "red"}), "unknown key"),
    (json.dumps({"prompt": "a red circle", "masks": {"circle": "missing.png"}}), "is not a file"),
    (json.dumps({"prompt": "a red circle", "seed": "one"}), "must be an int"),
])
def test_bad_prompt_files_are_named(tmp_path, text, message):
    j = tmp_path / "p.jsonl"
    j.write_text(text + "\n")
    with pytest.raises(SweepError, match=message):
        read_items(j)


def test_a_sweep_resumes_and_redoes_a_corrupted_shard(pipe, prompt_file, tmp_path):
    out = tmp_path / "sweep"
    items = read_items(prompt_file)
    assert run_sweep(pipe, items, out, SETTINGS, batch_size=2) == [i.id for i in items]
    first = load(out)
    assert type(first) is list  # one type, whether pandas is installed or not
    assert [r["id"] for r in first] == [i.id for i in items] and len(list((out / "images").iterdir())) == 3
    assert run_sweep(pipe, items, out, SETTINGS, batch_size=2) == []  # nothing left to do
    shard = sorted((out / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:200])  # a shard cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        redone = run_sweep(pipe, items, out, SETTINGS, batch_size=2)
    assert any(shard.name in str(w.message) for w in caught)
    assert redone == ["000000-s0", "000001-s0"] and (out / "bad" / shard.name).exists()
    again = load(out)
    assert without_rank(again) == without_rank(first)  # the same batches, made again: the same figures


def test_records_hold_mass_words_and_localisation(pipe, prompt_file, tmp_path):
    out = tmp_path / "s"
    run_sweep(pipe, read_items(prompt_file)[:1], out, SETTINGS)
    rec = load(out, maps=True)[0]
    assert rec["prompt"] == PROMPTS[0] and [w["word"] for w in rec["words"]] == PROMPTS[0].split()
    for size, kinds in rec["mass"].items():
        total = [sum(v) for v in zip(*kinds.values())]
        assert all(abs(t - 1) < 1e-3 for t in total), (size, total)  # every step's shares sum to 1
    tr, image = made_again(pipe, PROMPTS[0])
    # the mass over all layers: per step, each slot kind's part of the attention (layers, heads, pixels averaged)
    kinds = np.array(tr.tokenization(0).kinds)
    per_key = np.mean([tr.maps(layer)[:, 0].float().mean(dim=(1, 2, 3)).numpy() for layer in tr.layers_of("cross")], 0)
    for kind in ("start", "word", "end", "pad"):
        share = per_key[:, kinds == kind].sum(1) / per_key.sum(1)  # (steps,)
        assert rec["mass"]["all"][kind] == pytest.approx(share, abs=1e-4), kind
    # "circle": its map against the red object the world's analyzer finds in the image
    from sdlens.world import analyze

    red = next(d for d in analyze(image) if d.color == "red").mask
    circle, heat = rec["words"][2], tr.word_map(2, size=image.shape[:2]).float()
    assert circle["kind"] == "shape"
    assert circle["all"] == {"iou": pytest.approx(iou(upper_half(heat), red)), "peak": bool(red.flat[int(heat.argmax())])}
    for size in (8, 16):  # the map of that size's layers alone
        alone = tr.word_map(2, size=image.shape[:2], layers=size).float()
        assert circle[str(size)]["iou"] == pytest.approx(iou(upper_half(alone), red)), size
    p = heat.flatten() / heat.sum()
    assert circle["entropy"] == pytest.approx(float(-(p * p.log()).sum() / np.log(p.numel())), abs=1e-4)
    y, x = divmod(int(heat.argmax()), heat.shape[1])
    assert circle["peak"] == pytest.approx([(y + 0.5) / 64, (x + 0.5) / 64], abs=1e-4)
    small = torch.nn.functional.interpolate(heat[None, None], size=(8, 8), mode="area")[0, 0]  # the map kept
    torch.testing.assert_close(rec["maps"]["2"].float(), small, rtol=1e-3, atol=1e-4)
    assert "kind" not in rec["words"][3]  # "on": no true mask


def test_settings_that_differ_are_refused(pipe, prompt_file, tmp_path):
    out = tmp_path / "s"
    run_sweep(pipe, read_items(prompt_file)[:1], out, SETTINGS)
    with pytest.raises(SweepError, match=r"steps: 3 there, 4 now"):
        run_sweep(pipe, read_items(prompt_file)[:1], out, {**SETTINGS, "num_inference_steps": 4})


def test_report_writes_tables_and_figures(pipe, prompt_file, tmp_path):
    from sdlens.commands.sweep import report

    out = tmp_path / "s"
    run_sweep(pipe, read_items(prompt_file), out, SETTINGS, batch_size=3)
    paths = report(str(out), log=lambda s: None)
    assert [p.name for p in paths] == ["summary.md", "mass.png", "localisation.png"]
    lines, records = paths[0].read_text().splitlines(), load(out)
    assert lines[0] == "# Sweep report: 3 images, 3 prompts"
    groups = (("8", "8×8"), ("16", "16×16"), ("all", "all"))
    for group, label in groups:  # each kind's share: averaged over the steps, then the images
        shares = [np.mean([np.mean(r["mass"][group][k]) for r in records]) for k in ("start", "word", "end", "pad")]
        assert f"| {label} | " + " | ".join(f"{v:.1%}" for v in shares) + " |" in lines, label
    for kind in ("shape", "colour"):  # over the kind's words: the mean IoU and the share of peaks on the mask
        words = [w for r in records for w in r["words"] if w.get("kind") == kind]
        assert len(words) == 4  # the three prompts' four objects
        cells = [f"{np.mean([w[g]['iou'] for w in words]):.2f} / {np.mean([w[g]['peak'] for w in words]):.0%}"
                 for g, _ in groups]
        assert f"| {kind} (4) | " + " | ".join(cells) + " |" in lines, kind
    scores = sorted(((np.mean([w["all"]["iou"] for w in r["words"] if "all" in w]), r["id"], r["prompt"])
                     for r in records), reverse=True)  # each prompt's mean IoU, best first
    top = lines.index("| IoU | item | prompt |")
    assert lines[top + 2:] == [f"| {s:.2f} | {item} | {prompt} |" for s, item, prompt in scores]


def _sweep_command(prompts, out, *extra):
    return [sys.executable, "-m", "sdlens", "sweep", str(prompts), "--out", str(out), "--num-inference-steps", "3",
            "--map-size", "8", "--no-progress", *extra]


# `sdlens sweep ...`, killed by SIGKILL when its third shard is written in full to its temporary file,
# just before it would be put in place: the worst moment, reached the same way every run
KILLED_AT_THE_THIRD_SHARD = """
import os, signal, sys

replace, shards = os.replace, []


def replace_or_die(src, dst):
    if str(dst).endswith(".safetensors"):
        shards.append(dst)
        if len(shards) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)


os.replace = replace_or_die
from sdlens.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_with_every_item_once(tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 4) + "\n")  # 12 items, batches of 2
    out = tmp_path / "s"
    command = _sweep_command(prompts, out, "--batch-size", "2")
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_THIRD_SHARD, *command[3:]], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((out / "shards").glob("*.safetensors"))) == 2  # the two batches finished before
    half = [p for p in (out / "shards").iterdir() if p.name.startswith(".sdlens")]
    assert len(half) == 1 and half[0].stat().st_size > 0  # the third: written, never put in place
    assert [r["id"] for r in load(out)] == [f"{i:06d}-s0" for i in range(4)]  # it is no shard: 4 items done
    subprocess.run(command, check=True, capture_output=True)
    ids = [r["id"] for r in load(out)]
    assert sorted(ids) == [f"{i:06d}-s0" for i in range(12)]  # each exactly once
    assert len(list((out / "shards").glob("*.safetensors"))) == 6  # the rerun made the 4 other batches
    assert [p for p in (out / "shards").iterdir() if p.name.startswith(".sdlens")] == half  # ignored, not read


@pytest.mark.slow
def test_two_processes_with_accelerate_give_the_records_of_one(prompt_file, tmp_path):
    pytest.importorskip("accelerate")
    one, two = tmp_path / "one", tmp_path / "two"
    # accelerate gives each CPU process one thread; the one-process run too, so that both reduce in the same order
    subprocess.run(_sweep_command(prompt_file, one, "--seeds", "2"), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "sdlens", *_sweep_command(prompt_file, two, "--seeds", "2")[3:]]
    done = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1 of 2" in done.stdout and "rank 0 of 2" in done.stdout
    a, b = load(one), load(two)
    assert {r["rank"] for r in b} == {0, 1}
    assert without_rank(a) == without_rank(b)  # every batch holds the same items: the very same numbers


def test_sweep_command_errors_are_one_line(tmp_path, capsys):
    from sdlens.cli import main

    assert main(["sweep", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no prompt file" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()


def test_given_masks_are_measured(pipe, tmp_path):
    """A mask given in the prompt file is the truth for its word: a word's own map region (IoU 1, peak on it),
    all but it (IoU 0, peak off it), the left half (the IoU and peak computed here)."""
    prompt = "a red circle on the left"
    tr, _ = made_again(pipe, prompt)
    maps = {i: tr.word_map(i, size=(64, 64)).float() for i in (1, 2, 5)}
    left = np.zeros((64, 64), bool)
    left[:, :32] = True
    masks = {"left": save_mask(left, tmp_path / "left.png"),
             "circle": save_mask(upper_half(maps[2]), tmp_path / "own.png"),  # the map's own upper half
             "red": save_mask(~upper_half(maps[1]), tmp_path / "not.png")}  # all but it
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": prompt, "masks": masks}) + "\n")
    run_sweep(pipe, read_items(j), tmp_path / "s", SETTINGS)
    words = load(tmp_path / "s")[0]["words"]
    assert [i for i, w in enumerate(words) if w.get("kind") == "given"] == [1, 2, 5]
    assert all("kind" not in w for i, w in enumerate(words) if i not in (1, 2, 5))  # given masks replace the world's
    assert words[2]["all"] == {"iou": 1.0, "peak": True}
    assert words[1]["all"] == {"iou": 0.0, "peak": False}
    assert words[5]["all"] == {"iou": pytest.approx(iou(upper_half(maps[5]), left)),
                               "peak": bool(left.flat[int(maps[5].argmax())])}
