"""sdlens.anatomy and `sdlens anatomy`: layer roles, sizes, parameter and FLOP shares."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdlens.anatomy import anatomy
from sdlens.models.families import sd3, sd15_layout


def test_sd15_layout_anatomy():
    a = anatomy(sd15_layout(width=32, sample_size=16))
    assert a.count("cross") == 16 and a.count("self") == 16
    assert sorted({r.map_size[0] for r in a.layers}) == [2, 4, 8, 16]
    # parameters of the attention layers are the sum of their modules' parameters
    unet = sd15_layout(width=32, sample_size=16).unet
    mods = dict(unet.named_modules())
    assert a.params_attention == sum(p.numel() for r in a.layers for p in mods[r.name].parameters())
    assert 0 < a.flops_attention < a.flops_total


def test_sd3_joint_layers_give_both_kinds():
    a = anatomy(sd3(), flops=True)
    assert a.count("cross") == 2 and a.denoiser == "SD3Transformer2DModel"
    assert a.flops_attention > 0


@pytest.mark.slow  # 8 s: two fresh interpreters importing torch and diffusers
def test_cli_anatomy():
    out = subprocess.run([sys.executable, "-m", "sdlens.cli", "anatomy", "--model", "random:sd1", "--no-flops"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in out.stdout and "cross" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "sdlens.cli", "anatomy", "--model", "random:nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "choose one of" in bad.stderr
