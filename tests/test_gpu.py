"""The capture's GPU-only paths (page-locked asynchronous storage, GPU memory that does not hold the
trace), checked by scripts/gpu_checks.py on a CUDA device; skipped where there is none."""

from __future__ import annotations

import sys

import pytest
import torch
from _load import load_module


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_checks_pass_on_cuda(monkeypatch, capsys):
    checks = load_module("scripts/gpu_checks.py")
    monkeypatch.setattr(sys, "argv", ["gpu_checks.py", "--device", "cuda"])
    assert checks.main() == 0, capsys.readouterr().out
