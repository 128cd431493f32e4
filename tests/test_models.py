"""The built-in model: its architecture, a few-step training run end to end, export, loading, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdlens.errors import ModelError
from sdlens.models import configs
from sdlens.models.configs import TinyConfig
from sdlens.models.train import Budget

# A smoke run: every stage a few steps on small batches, on the CPU.
SMOKE = ["--device", "cpu", "--no-progress", "--log-every", "1", "--vae-batch", "4", "--unet-batch", "4"]


def run_cli(*args: str) -> None:
    from sdlens.cli import main

    assert main(["train-tiny", *args]) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A pipeline folder from a 3-step VAE + 3-step UNet run of the default config."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_cli("--out", str(out), "--vae-steps", "3", "--unet-steps", "3", *SMOKE)
    return out


def cross_attention_calls(unet, cfg: TinyConfig) -> list[tuple[str, int]]:
    """(layer name, query count) of every cross-attention call in one UNet forward."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: calls.append((name, out.shape[1])))
        for name, m in unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        with torch.no_grad():
            s = cfg.latent_size
            unet(
                torch.randn(1, cfg.latent_channels, s, s),
                10,
                encoder_hidden_states=torch.randn(1, 77, cfg.text_width),
            )
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_architecture_matches_the_issue():
    cfg = TinyConfig()
    calls = cross_attention_calls(configs.build_unet(cfg), cfg)
    sides = [int(n**0.5) for _, n in calls]
    assert sides == configs.cross_attention_sizes(cfg) == [16, 16, 8, 8, 8, 8, 8, 16, 16, 16]
    assert len(calls) == 10 and set(sides) == {16, 8}
    assert all(
        name.startswith(("down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2")) for name, _ in calls
    )

    vae = configs.build_vae(cfg)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)

    text = configs.build_text_encoder(cfg)
    assert text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77
    assert text.config.eos_token_id == 49407
    with torch.no_grad():
        assert text(torch.tensor([[49406, 320, 49407] + [49407] * 74])).last_hidden_state.shape == (1, 77, 64)


@pytest.mark.parametrize("layers_per_block,transformer_layers", [(1, 1), (2, 2)])
def test_cross_attention_sizes_follow_the_config(layers_per_block, transformer_layers):
    cfg = TinyConfig(
        unet_layers_per_block=layers_per_block,
        unet_transformer_layers=transformer_layers,
        unet_channels=(32, 64, 64),
    )
    sides = [int(n**0.5) for _, n in cross_attention_calls(configs.build_unet(cfg), cfg)]
    assert sides == configs.cross_attention_sizes(cfg)


def test_text_encoder_without_layers_keeps_each_token_in_its_slot():
    cfg = TinyConfig(text_layers=0)
    text = configs.build_text_encoder(cfg).eval()
    a = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    b = a.clone()
    b[0, 2] = 1746  # change one word: only its slot may change
    with torch.no_grad():
        diff = (text(a).last_hidden_state - text(b).last_hidden_state).abs().sum(-1)[0]
    assert diff[2] > 0 and torch.count_nonzero(diff) == 1


def test_config_validation():
    with pytest.raises(ModelError, match="text_mode"):
        TinyConfig(text_mode="bert")
    with pytest.raises(ModelError, match="text_layers"):
        TinyConfig(text_mode="clip", text_layers=0)
    with pytest.raises(ModelError, match="two_object_prob must be between 0 and 1, got 1.5"):
        TinyConfig(two_object_prob=1.5)
    assert TinyConfig.from_dict(TinyConfig().to_dict()) == TinyConfig()
    with pytest.raises(ModelError, match="batch size must be at least 1, got 0"):
        Budget(steps=1, batch_size=0)
    with pytest.raises(ModelError, match="learning rate must be 0 or more, got -0.1"):
        Budget(steps=1, lr=-0.1)


def test_default_export_is_float16_and_small(tmp_path):
    """The default config, exported untrained: float16 safetensors, at most 30 MB in all."""
    from safetensors import safe_open

    from sdlens.models.train import export_pipeline
    from sdlens.tokens import load_clip_tokenizer

    cfg = TinyConfig()
    export_pipeline(
        tmp_path,
        cfg,
        configs.build_vae(cfg),
        configs.build_text_encoder(cfg),
        configs.build_unet(cfg),
        load_clip_tokenizer(),
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 30e6, f"{total / 1e6:.1f} MB"
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    for p in weights:
        with safe_open(str(p), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, p
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]


def test_smoke_run_loads_and_generates(trained):
    from sdlens.models import load_pipeline

    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "training.json"):
        assert (trained / sub).exists(), sub
    log = [json.loads(line) for line in (trained / "train" / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in log] == [
        ("vae", 1),
        ("vae", 2),
        ("vae", 3),
        ("unet", 1),
        ("unet", 2),
        ("unet", 3),
    ]
    assert all(e["loss"] > 0 for e in log)

    pipe = load_pipeline(trained, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latents' spread
    table = pipe.text_encoder.get_input_embeddings().weight  # (49408, 64)
    assert (
        torch.count_nonzero(table[1000]) == 0 and torch.count_nonzero(table[320]) > 0
    )  # loaded, not re-initialised
    image = pipe(
        "a red circle on the left",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)

    pipe16 = load_pipeline(trained, device="cpu", dtype=torch.float16, scheduler="ddim")
    assert pipe16.unet.dtype == torch.float16 and type(pipe16.scheduler).__name__ == "DDIMScheduler"


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with pytest.raises(FileExistsError, match="--resume"):
        run_cli("--out", str(out), "--vae-steps", "3", "--unet-steps", "5", *SMOKE)
    run_cli("--out", str(out), "--vae-steps", "3", "--unet-steps", "5", "--resume", *SMOKE)
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["stage"] == "unet"] == [1, 2, 3, 4, 5]  # 4 and 5 are new
    assert [e["step"] for e in log if e["stage"] == "vae"] == [1, 2, 3]  # nothing left to train
    state = torch.load(out / "train" / "checkpoints" / "unet.pt", weights_only=True)
    assert state["step"] == 5
    record = json.loads((out / "training.json").read_text())
    assert record["stages"]["unet"]["steps_this_run"] == 2 and len(record["earlier_runs"]) == 1


def test_vae_from_and_clip_stage(trained, tmp_path):
    """A UNet run reusing another run's VAE; the tiny-CLIP stage on its own."""
    out = tmp_path / "frozen"
    run_cli(
        "--out",
        str(out),
        "--vae-from",
        str(trained),
        "--unet-steps",
        "2",
        "--text-mode",
        "frozen",
        "--text-layers",
        "0",
        *SMOKE,
    )
    assert (out / "unet").exists() and not (out / "train" / "checkpoints" / "vae.pt").exists()
    a = (trained / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == a

    clip = tmp_path / "clip"
    run_cli(
        "--out",
        str(clip),
        "--stages",
        "clip",
        "--text-mode",
        "clip",
        "--text-layers",
        "1",
        "--clip-steps",
        "2",
        "--clip-batch",
        "8",
        *SMOKE,
    )
    assert (clip / "train" / "text_encoder" / "config.json").exists()


def test_missing_builtin_weights_say_how_to_make_them(monkeypatch, tmp_path):
    from sdlens.models import load

    monkeypatch.setitem(load.BUILTIN, "tiny", tmp_path / "tiny")
    monkeypatch.setitem(load.BUILTIN, "tiny-sd3", tmp_path / "tiny-sd3")
    with pytest.raises(FileNotFoundError, match="sdlens train-tiny --out") as info:
        load.load_pipeline()
    assert str(tmp_path / "tiny") in str(info.value)
    with pytest.raises(FileNotFoundError, match="sdlens train-tiny --arch sd3") as info:
        load.load_pipeline("tiny-sd3")
    assert str(tmp_path / "tiny-sd3") in str(info.value)
    with pytest.raises(ModelError, match="tiny, tiny-sd3"):
        load.load_pipeline("tiny-sd2")
    with pytest.raises(ModelError, match="no model_index.json"):  # a folder, but not a pipeline's
        load.load_pipeline(str(tmp_path))
    with pytest.raises(ModelError, match="no folder"):  # a path that is not there (not sent to the hub)
        load.load_pipeline(str(tmp_path / "missing"))


def test_init_from_starts_from_the_weights_and_records_them(trained, tmp_path):
    """--init-from: the UNet starts from that run's weights (with lr 0 it ends there too) and the
    new training.json carries the old one, so a shipped model's history is never lost."""
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    run_cli("--out", str(out), "--init-from", str(trained), "--vae-from", str(trained), "--unet-steps", "2",
            "--unet-lr", "0", "--text-mode", "frozen", "--text-layers", "1", *SMOKE)
    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(trained / sub), load_file(out / sub)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), sub
    record = json.loads((out / "training.json").read_text())
    assert record["init_from"]["path"] == str(trained)
    assert record["init_from"]["training"] == json.loads((trained / "training.json").read_text())


def test_cli_bad_budget_or_config_is_one_line_and_writes_nothing(tmp_path, capsys):
    from sdlens.cli import main

    out = tmp_path / "never"
    assert main(["train-tiny", "--out", str(out), "--unet-batch", "0"]) == 2
    assert "--unet-batch / --unet-lr: batch size must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(out), "--two-object-prob", "1.5"]) == 2
    assert "two_object_prob must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert not out.exists()


def test_precision_bf16_autocasts_on_the_cpu_and_a_bad_value_is_named(trained, tmp_path):
    from sdlens.models.train import Run

    assert json.loads((trained / "training.json").read_text())["precision"] == "fp32"  # CPU, auto
    def matmul_dtype(precision: str) -> torch.dtype:
        with Run(tmp_path / precision, TinyConfig(), device="cpu", precision=precision).autocast():
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    assert matmul_dtype("bf16") == torch.bfloat16
    assert matmul_dtype("fp32") == torch.float32
    assert matmul_dtype("auto") == torch.float32  # auto means bf16 on CUDA only
    with pytest.raises(ModelError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        Run(tmp_path / "never", TinyConfig(), device="cpu", precision="fp16")
    assert not (tmp_path / "never").exists()


def test_word_dropout_zeroes_only_word_slots_at_its_rate():
    from sdlens.models.train import word_slot_dropout
    from sdlens.tokens import load_clip_tokenizer

    tok = load_clip_tokenizer()
    captions = ["a small red circle on the left and a blue square", "a green triangle", ""] * 200
    ids = torch.tensor(tok(captions, padding="max_length", max_length=77).input_ids)  # (600, 77)
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    is_word = torch.tensor([[i not in special for i in row] for row in ids.tolist()])
    assert is_word.sum(1)[:3].tolist() == [11, 3, 0]  # one slot per word in this vocabulary

    dropped = word_slot_dropout(ids, tok, 0.25, torch.Generator().manual_seed(0))
    assert not (dropped & ~is_word).any()  # never a start, end or padding slot
    rate = dropped.sum().item() / is_word.sum().item()
    assert abs(rate - 0.25) < 0.03, rate  # 2,800 word slots: the rate's standard error is 0.0085
    assert not word_slot_dropout(ids, tok, 0.0, torch.Generator()).any()
    with pytest.raises(ModelError, match="word_dropout must be between 0 and 1, got -0.1"):
        TinyConfig(word_dropout=-0.1)


def test_word_dropout_is_a_recorded_training_setting(tmp_path):
    out = tmp_path / "run"
    run_cli("--out", str(out), "--vae-steps", "1", "--unet-steps", "2", "--word-dropout", "0.3", *SMOKE)
    assert json.loads((out / "training.json").read_text())["config"]["word_dropout"] == 0.3


def test_tail_dropout_cuts_each_hit_caption_after_a_uniform_word():
    from sdlens.models.train import tail_slot_dropout
    from sdlens.tokens import load_clip_tokenizer

    tok = load_clip_tokenizer()
    captions = ["a red circle and a blue square", ""] * 2000  # 7 words in slots 1..7
    ids = torch.tensor(tok(captions, padding="max_length", max_length=77).input_ids)
    dropped = tail_slot_dropout(ids, tok, 0.5, torch.Generator().manual_seed(0))
    full, empty = dropped[0::2], dropped[1::2]
    assert not empty.any()  # "" has no word to cut after
    assert not full[:, :2].any()  # the start slot and the first word are always kept
    hit = full.any(1)
    assert abs(hit.float().mean().item() - 0.5) < 0.04  # 2,000 captions: standard error 0.011
    kept = 77 - full[hit].sum(1)  # slots 0..cut: the start slot and the first `cut` words
    # each cut after word 1..7 equally often (7 ties with no dropped word slot, only the end and padding)
    counts = torch.bincount(kept - 1, minlength=8)[1:]
    assert counts.sum() == hit.sum()
    assert (counts.float() / counts.sum() - 1 / 7).abs().max() < 0.05, counts
    # a cut is a tail: once a slot is dropped, every later one is
    assert (full[:, 1:] >= full[:, :-1]).all()
