"""TrAct core: exact against a dense float64 reference, transparent to everything but the weight gradient."""

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from tract_bench.tract import TrAct, apply_tract

CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=(2, 1)),
    dict(kernel_size=(3, 5), stride=(2, 1), padding="valid", dilation=(1, 2)),
    dict(kernel_size=(2, 4), padding="same", bias=False),
    dict(kernel_size=3, padding="same", padding_mode="reflect", dilation=2),
    dict(kernel_size=3, stride=(1, 2), padding=2, padding_mode="reflect", bias=False),
    dict(kernel_size=4, stride=4),  # a ViT-style patch embedding
]


def dense_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The rows x n matrix A, built independently of tract.py: pad by hand, then unfold."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif conv.padding == "valid":
        pad = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    u = F.unfold(F.pad(x, pad, mode=mode), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def reference_grad(grad_w: torch.Tensor, a: torch.Tensor, lam: float) -> torch.Tensor:
    a = a.double()
    m = a.T @ a / a.shape[0] + lam * torch.eye(a.shape[1], dtype=torch.float64)
    return (grad_w.reshape(grad_w.shape[0], -1).double() @ torch.linalg.inv(m)).reshape(grad_w.shape)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def plain_and_tract_grads(layer, x, lam, **kw):
    """Run the plain layer and its TrAct twin on x with the same upstream gradient."""
    tract = TrAct(copy.deepcopy(layer), lam, **kw)
    xp, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    zp, zt = layer(xp), tract(xt)
    gz = torch.randn_like(zp)
    zp.backward(gz)
    zt.backward(gz)
    return layer, tract, (zp, xp), (zt, xt)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_dense_reference(case, dtype, tol):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, **case).to(dtype)
    x = torch.randn(6, 3, 16, 13, dtype=dtype)
    plain, tract, (zp, xp), (zt, xt) = plain_and_tract_grads(conv, x, 0.1)
    a = dense_patches(conv, x.double())
    assert a.shape[0] > a.shape[1]  # rows >= n: the usual regime
    assert rel_err(tract.weight.grad, reference_grad(plain.weight.grad, a, 0.1)) <= tol
    # Only the weight gradient changes: forward, input and bias gradients are bit-identical.
    assert torch.equal(zp, zt) and torch.equal(xp.grad, xt.grad)
    if case.get("bias", True):
        assert torch.equal(plain.bias.grad, tract.bias.grad)


def test_reference_patches_reproduce_the_plain_gradient():
    """The test's own reference is right: dL/dz^T A equals autograd's weight gradient."""
    torch.manual_seed(0)
    for case in CONV_CASES:
        conv = nn.Conv2d(3, 4, **case).double()
        x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
        z = conv(x)
        gz = torch.randn_like(z)
        z.backward(gz)
        manual = gz.permute(0, 2, 3, 1).reshape(-1, 4).T @ dense_patches(conv, x)
        assert rel_err(manual.reshape(conv.weight.shape), conv.weight.grad) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", [(50, 12), (4, 9, 12)], ids=["2d", "tokens"])
def test_linear_matches_dense_reference(shape, dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    plain, tract, (zp, xp), (zt, xt) = plain_and_tract_grads(lin, x, 0.2)
    ref = reference_grad(plain.weight.grad, x.reshape(-1, 12), 0.2)
    assert rel_err(tract.weight.grad, ref) <= tol
    assert torch.equal(zp, zt) and torch.equal(xp.grad, xt.grad) and torch.equal(plain.bias.grad, tract.bias.grad)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fewer_rows_than_inputs(dtype, tol):
    """rows < n (one tiny image, large patch; a few tokens): A^T A is singular, lam keeps it exact and stable."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=8, stride=8).to(dtype)  # n = 192
    x = torch.randn(1, 3, 16, 8, dtype=dtype)  # rows = 2
    plain, tract, _, _ = plain_and_tract_grads(conv, x, 0.1)
    a = dense_patches(conv, x.double())
    assert a.shape[0] < a.shape[1]
    assert rel_err(tract.weight.grad, reference_grad(plain.weight.grad, a, 0.1)) <= tol
    lin = nn.Linear(48, 5).to(dtype)
    x = torch.randn(3, 48, dtype=dtype)
    plain, tract, _, _ = plain_and_tract_grads(lin, x, 0.05)
    assert rel_err(tract.weight.grad, reference_grad(plain.weight.grad, x, 0.05)) <= tol
    assert torch.isfinite(tract.weight.grad).all()


def test_chunking_is_exact_and_bounded(monkeypatch):
    """The Gram is built from unfolds no larger than chunk_bytes, whole images or bands of rows alike."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=5, stride=2, padding=2).double()
    x = torch.randn(6, 3, 24, 20, dtype=torch.float64)
    sizes = []
    unfold = F.unfold

    def spy(*args, **kw):
        out = unfold(*args, **kw)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(F, "unfold", spy)
    ref = None
    one_image = 12 * 10 * 75 * 8  # output positions x n x float64 bytes
    for bound in [10**9, 2 * one_image, one_image - 1, 3 * 10 * 75 * 8]:
        sizes.clear()
        torch.manual_seed(1)  # the same upstream gradient each time
        _, tract, _, _ = plain_and_tract_grads(conv, x, 0.1, chunk_bytes=bound)
        assert sizes and max(sizes) <= bound
        ref = tract.weight.grad if ref is None else ref
        assert rel_err(tract.weight.grad, ref) < 1e-12
    assert len(sizes) == 6 * 4  # the last bound: bands of 3 of the 12 output rows, per image


def test_scale_invariance_of_the_activation_step():
    """The paper's premise: TrAct's SGD step moves z the same whatever the input scale; plain SGD by c^2."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    x = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    gz = torch.randn(8, 8, 12, 12, dtype=torch.float64)  # a loss linear in z: L = <gz, z>

    def delta_z(layer, scale):
        layer = copy.deepcopy(layer)
        layer.weight.grad = None
        (layer(scale * x) * gz).sum().backward()
        # SGD step dW = -grad, so dZ = A dW^T = the conv of the input with -grad (no bias).
        return F.conv2d(scale * x, -layer.weight.grad, padding=1)

    tract = TrAct(copy.deepcopy(conv), 1e-9)
    base_t, base_p = delta_z(tract, 1.0), delta_z(conv, 1.0)
    for c in (0.1, 10.0):
        assert rel_err(delta_z(tract, c), base_t) < 1e-4
        assert rel_err(delta_z(conv, c), c**2 * base_p) < 1e-12


def test_large_lambda_recovers_the_plain_gradient():
    torch.manual_seed(0)
    lam = 1e8
    plain, tract, _, _ = plain_and_tract_grads(nn.Conv2d(3, 4, 3).double(), torch.randn(2, 3, 9, 9).double(), lam)
    assert rel_err(lam * tract.weight.grad, plain.weight.grad) < 1e-6


def test_same_parameters_and_interchangeable_state_dicts():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    params = {n: id(p) for n, p in model.named_parameters()}
    conv1 = model.conv1
    assert apply_tract(model, 0.1) == "conv1"
    assert model.conv1 is conv1 and isinstance(model.conv1, nn.Conv2d)
    assert {n: id(p) for n, p in model.named_parameters()} == params
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(model.state_dict())  # strict: same keys both ways
    model.load_state_dict(plain.state_dict())
    clone = copy.deepcopy(model)  # checkpoints that pickle the module work too
    assert clone.conv1.tract_lam == 0.1


def test_finds_the_first_layer_of_common_models():
    assert apply_tract(torchvision.models.resnet50(), 0.1) == "conv1"
    assert apply_tract(timm.create_model("resnet18", pretrained=False), 0.1) == "conv1"
    assert apply_tract(timm.create_model("vit_tiny_patch16_224", pretrained=False), 0.1) == "patch_embed.proj"

    class LinearPatchViT(nn.Module):  # a ViT whose embedding is an nn.Linear on flattened 4x4 patches
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 10)  # defined first, runs last: tracing must go by execution order
            self.emb = nn.Linear(48, 16)

        def forward(self, x):
            patches = F.unfold(x, 4, stride=4).transpose(1, 2)
            return self.head(self.emb(patches).mean(1))

    vit = LinearPatchViT()
    assert apply_tract(vit, 0.1) == "emb" and type(vit.emb).__name__ == "TrActLinear"
    assert apply_tract(torchvision.models.resnet18(), 0.1, layer="layer1.0.conv1") == "layer1.0.conv1"


@pytest.mark.parametrize("lam", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_refuses_bad_lambda(lam):
    with pytest.raises(ValueError, match="stem.*lam must be a finite number > 0"):
        TrAct(nn.Conv2d(3, 4, 3), lam, name="stem")


def test_refuses_layers_it_cannot_compute_exactly():
    model = torchvision.models.resnet18()
    model.conv1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="conv1.*frozen"):
        apply_tract(model, 0.1)
    with pytest.raises(ValueError, match="stem.*groups=3"):
        TrAct(nn.Conv2d(3, 6, 3, groups=3), name="stem")
    for layer in [timm.layers.Conv2dSame(3, 8, 3, stride=2), timm.layers.StdConv2d(3, 8, 3)]:
        with pytest.raises(ValueError, match="stem.*not a plain nn.Conv2d"):
            TrAct(layer, name="stem")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        apply_tract(torchvision.models.resnet18(), 0.1, layer="nope")


def test_bf16_autocast_resnet18_step():
    """Under CPU bf16 autocast TrAct runs; its gradient is exactly the bf16 plain gradient, preconditioned in fp32,
    and deviates from the fp32 TrAct gradient no more than bf16 moves the plain gradient."""

    def grads(tract, bf16):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if tract:
            apply_tract(model, 0.1)
        x, y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            F.cross_entropy(model(x), y).backward()
        return model.conv1.weight.grad, x

    plain_bf, x = grads(False, True)
    tract_bf, _ = grads(True, True)
    tract_fp, _ = grads(True, False)
    plain_fp, _ = grads(False, False)
    assert tract_bf.dtype == torch.float32 and torch.isfinite(tract_bf).all()
    a = dense_patches(nn.Conv2d(3, 64, 3, 1, 1), x.double())
    assert rel_err(tract_bf, reference_grad(plain_bf, a, 0.1)) < 1e-4
    assert rel_err(tract_bf, tract_fp) <= 1.5 * rel_err(plain_bf, plain_fp) + 1e-3


def test_torch_compile_gives_eager_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    apply_tract(model, 0.1, input_size=(3, 8, 8), chunk_bytes=4096)  # several chunks inside the compiled graph
    compiled = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(torch.compile(compiled)(x), y).backward()
    for p, q in zip(model.parameters(), compiled.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5
    assert not math.isnan(compiled[0].weight.grad.sum().item())
