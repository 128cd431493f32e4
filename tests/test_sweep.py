"""sdlens sweep / report: items, resumable shards, a corrupted shard redone, settings refused, one
process and two (accelerate launch) giving the same records, a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

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
    circle = rec["words"][2]
    assert circle["kind"] == "shape" and set(circle) >= {"all", "8", "16", "entropy", "peak"}
    assert 0 < circle["entropy"] <= 1
    assert rec["maps"]["2"].shape == (8, 8)
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
    text = paths[0].read_text()
    assert "3 images, 3 prompts" in text and "| shape (4) |" in text and "| colour (4) |" in text


def _sweep_command(prompts, out, *extra):
    return [sys.executable, "-m", "sdlens", "sweep", str(prompts), "--out", str(out), "--num-inference-steps", "3",
            "--map-size", "8", "--no-progress", *extra]


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_with_every_item_once(tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 4) + "\n")  # 12 items, batches of 2
    out = tmp_path / "s"
    proc = subprocess.Popen(_sweep_command(prompts, out, "--batch-size", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.safetensors"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shards_before = len(list((out / "shards").glob("*.safetensors")))
    assert 2 <= shards_before < 6, shards_before
    subprocess.run(_sweep_command(prompts, out, "--batch-size", "2"), check=True, capture_output=True)
    ids = [r["id"] for r in load(out)]
    assert sorted(ids) == [f"{i:06d}-s0" for i in range(12)]  # each exactly once
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".sdlens")]  # no half-written shard left


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
    """A mask given in the prompt file is the truth for its word (here the whole left half)."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a red circle on the left", "masks": {"left": "left.png"}}) + "\n")
    run_sweep(pipe, read_items(j), tmp_path / "s", SETTINGS)
    words = load(tmp_path / "s")[0]["words"]
    assert words[5]["kind"] == "given" and set(words[5]["all"]) == {"iou", "peak"}
    assert all("kind" not in w for i, w in enumerate(words) if i != 5)  # given masks replace the world's
