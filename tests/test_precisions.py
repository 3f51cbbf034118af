"""Every precision on every device: TrAct's gradient under autocast and a whole tract-train run.

The CPU cases run everywhere (CI included); the CUDA cases run where a GPU is visible (`pytest -m cuda` on the
GPU machine) and are skipped elsewhere. They are the checks the CPU suite cannot make: cuDNN's bf16/fp16
kernels in channels_last, GradScaler on CUDA, and the loop's device placement.
"""

import json
import math

import pytest
import torch
import torch.nn as nn

from test_train import tiny_run
from test_tract import dense_patches, reference_grad, rel_err
from tract_bench import train
from tract_bench.config import resolve_precision
from tract_bench.tract import TrAct

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_tract_preconditions_the_autocast_gradient_in_fp32(device, dtype):
    """In channels_last (tract-train's layout on a GPU) and under autocast, where the plain weight gradient comes
    from the low-precision kernel, TrAct must precondition exactly that gradient with an fp32 Gram (of the fp32
    input) and an fp64 solve."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 32, 3, padding=1).to(device, memory_format=torch.channels_last)
    tract = TrAct(nn.Conv2d(3, 32, 3, padding=1), 0.1).to(device, memory_format=torch.channels_last)
    tract.load_state_dict(conv.state_dict())
    x = torch.randn(16, 3, 16, 16, generator=g).to(device, memory_format=torch.channels_last)
    gz = torch.randn(16, 32, 16, 16, generator=g).to(device)
    for layer in (conv, tract):
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            z = layer(x)
        assert z.dtype == (dtype or torch.float32)
        z.backward(gz.to(z.dtype))
    assert tract.weight.grad.dtype == torch.float32 and torch.isfinite(tract.weight.grad).all()
    expected = reference_grad(conv.weight.grad.cpu(), dense_patches(conv, x.cpu().double()), 0.1)
    assert rel_err(tract.weight.grad.cpu(), expected) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_epoch_in_each_precision(tiny_cifar10_root, tmp_path, device, precision):
    # two steps and one evaluation batch: fp16 autocast runs ~100x slower on a CPU than fp32
    folder = train.run(tiny_run(tiny_cifar10_root, tmp_path, f"device={device}", f"precision={precision}",
                                "tract.lam=0.1", "data.train_subset=40", "data.test_subset=20"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["precision"] == precision
    assert summary["device"].startswith("cpu:") == (device == "cpu")
    assert all(math.isfinite(v) for v in summary["final"].values())
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # GradScaler on for fp16 only
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_means_bf16_and_channels_last_on_cuda(tiny_cifar10_root, tmp_path):
    folder = train.run(tiny_run(tiny_cifar10_root, tmp_path, "tract.lam=0.1"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["device"] == torch.cuda.get_device_name(0)


def test_auto_precision_on_a_cpu_is_fp32():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]  # as asked


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16")])
def test_auto_precision_on_cuda_is_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
