"""The precision a run picks when none is given: the card's capability decides, not
torch.cuda.is_bf16_supported() (which says yes on a T4 through emulation)."""
import pytest
import torch

import common


@pytest.mark.parametrize("capability, want", [((7, 5), "fp16"),   # T4 (Colab)
                                              ((7, 0), "fp16"),   # V100
                                              ((8, 0), "bf16"),   # A100
                                              ((9, 0), "bf16")])  # H100
def test_cuda_precision_follows_compute_capability(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # the emulated yes
    assert common.default_precision(torch.device("cuda", 0)) == want


def test_cpu_precision_is_fp32():
    assert common.default_precision(torch.device("cpu")) == "fp32"
