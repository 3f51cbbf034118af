"""tract_bench.layout: NHWC up to a stage, NCHW from it on; the same values in every layout; tuning keeps the
fastest candidate and leaves the model and the random state as they were."""

import copy

import pytest
import torch
from torch import nn

from tract_bench import layout
from tract_bench.models import resnet_cifar
from tract_bench.tract import apply_tract


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return resnet_cifar("resnet18", 10)


def nhwc(conv):
    return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def test_switch_points_are_the_children_with_convolutions(resnet):
    assert layout.switch_points(resnet) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert layout.switch_points(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) == []


def test_apply_lays_out_each_stage_and_converts_where_it_switches(resnet):
    layout.apply(resnet, "layer3")
    assert nhwc(resnet.conv1) and nhwc(resnet.layer2[1].conv2)
    assert resnet.layer3[0].conv1.weight.is_contiguous() and resnet.layer4[1].conv2.weight.is_contiguous()
    seen = {}
    resnet.layer2.register_forward_hook(lambda m, i, o: seen.update(layer2=o.is_contiguous()))
    resnet.layer3.register_forward_hook(lambda m, i, o: seen.update(layer3=o.is_contiguous()))
    resnet(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    assert seen == {"layer2": False, "layer3": True}
    assert layout.describe(resnet, "layer3") == "channels_last (nchw from layer3)"
    assert layout.describe(resnet, "conv1") == "nchw" and layout.describe(resnet, None) == "channels_last"


def test_apply_again_replaces_the_layout_and_a_bad_name_changes_nothing(resnet):
    layout.apply(resnet, "layer2")
    layout.apply(copy.deepcopy(resnet), None)  # a copy's hooks are its own
    layout.apply(resnet, None)
    assert nhwc(resnet.layer4[1].conv2) and not any(m._forward_pre_hooks for m in resnet.modules())
    layout.apply(resnet, "layer4")
    with pytest.raises(ValueError, match="no child 'stem'"):
        layout.apply(resnet, "stem")
    assert resnet.layer4[0].conv1.weight.is_contiguous() and len(resnet.layer4._forward_pre_hooks) == 1


@pytest.mark.parametrize("nchw_from", [None, "conv1", "layer2", "layer4"])
def test_every_layout_computes_the_same_function_and_gradients(resnet, nchw_from):
    apply_tract(resnet, 0.1)  # TrAct's first layer, in whichever layout it lands
    x = torch.randn(4, 3, 32, 32)
    other = layout.apply(copy.deepcopy(resnet), nchw_from)
    for model in (resnet, other):
        model(x).square().mean().backward()
    torch.testing.assert_close(other(x), resnet(x), rtol=1e-3, atol=1e-4)
    for (name, a), b in zip(resnet.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_tune_keeps_the_fastest_candidate(resnet, monkeypatch):
    """On a fake clock: layer2 costs 1 more in NHWC, the stem 0.5 more in NCHW, layer1 0.25 less in NHWC; only
    NCHW from layer2 on has all three wins."""
    clock = [0.0]

    def fake_step(model, x, y, amp_dtype):
        clock[0] += 1 + nhwc(model.layer2[0].conv1) + 0.5 * (not nhwc(model.conv1)) - 0.25 * nhwc(model.layer1[0].conv1)

    monkeypatch.setattr(layout, "_step", fake_step)
    monkeypatch.setattr(layout, "perf_counter", lambda: clock[0])
    assert layout.tune(resnet, (2, 3, 32, 32), 10) == "layer2"


def test_tune_leaves_model_and_random_state_alone(resnet):
    resnet.fc = nn.Sequential(nn.Dropout(0.5), resnet.fc)  # draws from the global generator in training
    before = copy.deepcopy(resnet.state_dict())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    choice = layout.tune(resnet, (2, 3, 32, 32), 10)
    assert choice in [None] + layout.switch_points(resnet)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is where it was
    for key, value in resnet.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_pre_hooks for m in resnet.modules())


def test_only_a_cpu_run_that_may_vary_and_is_not_fp16_is_timed():
    assert layout.timed_here("cpu", None) and layout.timed_here("cpu", torch.bfloat16)
    assert not layout.timed_here("cpu", None, deterministic=True)
    assert not layout.timed_here("cpu", torch.float16) and not layout.timed_here("cuda", None)
