"""tract_bench.smallmap: 3x3 convolutions on 2x2 maps as one matrix product compute the convolution's values and
gradients, are taken only where they apply, and leave the model's parameters and other layers alone."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tract_bench import layout, smallmap
from tract_bench.models import resnet_cifar
from tract_bench.tract import apply_tract


@pytest.fixture
def calls(monkeypatch):
    """How often the matrix-product path ran."""
    seen = []
    real = smallmap._Dense2x2.apply
    monkeypatch.setattr(smallmap._Dense2x2, "apply", lambda *a: seen.append(1) or real(*a))
    return seen


def twins(c_in=6, c_out=5, bias=True):
    torch.manual_seed(0)
    plain = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
    fast = copy.deepcopy(plain)
    fast.__class__ = smallmap.SmallMapConv2d
    return plain, fast


def layout_of(t):
    return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_format,w_format", [(torch.contiguous_format, torch.contiguous_format),
                                               (torch.channels_last, torch.channels_last),
                                               (torch.channels_last, torch.contiguous_format)])
def test_matches_the_convolution_its_gradients_and_their_layouts(calls, bias, x_format, w_format):
    plain, fast = twins(bias=bias)
    plain, fast = plain.to(memory_format=w_format), fast.to(memory_format=w_format)
    x = torch.randn(7, 6, 2, 2).to(memory_format=x_format)
    grad = torch.randn(7, 5, 2, 2)
    outs, grads = [], []
    for conv in (plain, fast):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        y.backward(grad)
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in conv.parameters()])
    assert calls == [1]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert layout_of(outs[1]) == layout_of(x) and layout_of(grads[1][0]) == layout_of(x)
    assert layout_of(fast.weight.grad) == layout_of(fast.weight)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_second_order_gradients_are_refused():
    _, fast = twins()
    x = torch.randn(3, 6, 2, 2, requires_grad=True)
    (g,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_weight_only_and_input_only_gradients(calls):
    plain, fast = twins()
    x = torch.randn(3, 6, 2, 2, requires_grad=True)
    fast.requires_grad_(False)
    fast(x).sum().backward()  # the input's gradient alone (a frozen layer)
    torch.testing.assert_close(x.grad, torch.autograd.grad(plain(x).sum(), x)[0], rtol=1e-5, atol=1e-5)
    fast.requires_grad_(True)
    fast(x.detach()).sum().backward()  # the weight's alone (a first layer)
    plain(x.detach()).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["4x4 map", "bf16 autocast", "float64", "unbatched"])
def test_falls_back_to_the_convolution_elsewhere(calls, case):
    plain, fast = twins()
    x = {"4x4 map": torch.randn(2, 6, 4, 4), "unbatched": torch.randn(6, 2, 2)}.get(case, torch.randn(2, 6, 2, 2))
    if case == "float64":
        plain, fast, x = plain.double(), fast.double(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16 autocast"):
        assert torch.equal(fast(x), plain(x))
    assert calls == []


def test_convert_takes_the_convolutions_on_2x2_maps_and_keeps_the_model(calls):
    torch.manual_seed(0)
    plain = resnet_cifar("resnet18", 10)
    apply_tract(plain, 0.1)  # TrAct's first layer is no plain nn.Conv2d: left as it is
    plain.train()
    plain.layer1[0].bn1.eval()  # a module in another mode than its parents keeps it
    fast = copy.deepcopy(plain)
    assert smallmap.convert(fast, (3, 32, 32)) == 3
    converted = [name for name, m in fast.named_modules() if isinstance(m, smallmap.SmallMapConv2d)]
    assert converted == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]  # layer4.0.conv1 has stride 2
    assert [m.training for m in fast.modules()] == [m.training for m in plain.modules()]
    assert not fast.layer1[0].bn1.training and fast.layer1[0].bn2.training
    for key, value in plain.state_dict().items():  # no BatchNorm statistics moved by the probing pass
        assert torch.equal(fast.state_dict()[key], value), key
    assert layout.describe(fast, "layer3") == "channels_last (nchw from layer3), 2x2 maps as matmuls"
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    for model in (plain, fast):
        F.cross_entropy(model(x), y).backward()
    assert len(calls) == 3
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)
    assert smallmap.convert(copy.deepcopy(plain), (3, 64, 64)) == 0  # 4x4 maps at the end: nothing to take


def test_only_plain_padded_3x3_convolutions_are_eligible():
    assert smallmap.eligible(nn.Conv2d(4, 4, 3, padding=1))
    for conv in (nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding=2, dilation=2)):
        assert not smallmap.eligible(conv)


def test_a_model_without_parameters_converts_nothing():
    assert smallmap.convert(nn.Sequential(nn.Flatten()), (3, 2, 2)) == 0


@pytest.mark.slow
def test_compiled_converted_model_matches_eager():
    """torch.compile traces the matrix-product path (tract-train's compile=true on a CPU): same values and
    gradients as the eager convolution."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(32, 3))
    fast = copy.deepcopy(plain)
    assert smallmap.convert(fast, (4, 2, 2)) == 2
    x = torch.randn(5, 4, 2, 2)
    compiled = torch.compile(fast)
    for model in (plain, compiled):
        model(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)
