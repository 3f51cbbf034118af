"""Memory layout of a model on a CPU: channels_last (NHWC) up to one of its stages, NCHW from there on.

Which layout makes oneDNN's convolutions fastest depends on the CPU and on the size of the feature maps. For the paper's
CIFAR ResNet-18 training step at batch 128 on 2 cores: on an AMD EPYC, NHWC throughout beat NCHW throughout (0.61 s
against 0.74 s); on an Intel Xeon with AVX-512, NHWC throughout is the slowest (0.70 s against 0.65 s), because its
3x3 convolutions on the 4x4 and 2x2 maps of layer3 and layer4 run 2x slower in NHWC, while those on the larger maps of
layer1 and layer2 run faster; NHWC up to layer2 and NCHW from layer3 on takes 0.57 s there. So on a CPU,
`channels_last: auto` times forward and backward for each place where the layout could switch and keeps the fastest
(`tune`). A switch changes only where values lie in memory, never the values; the kernels' float rounding does differ.
`auto` first hands the 3x3 convolutions on 2x2 maps to matrix products (tract_bench.smallmap), which removes
layer4's slow NHWC convolutions from the comparison: on the Xeon, NHWC throughout and NCHW from layer3 or from
layer4 then all took 0.50-0.53 s a step, and two benchmark runs timed NCHW from layer3 and NHWC throughout.

The candidates are the model's top-level children that hold a 2-d convolution, in the order the model defines them,
taken as the order it runs them (as in torchvision's and timm's CNNs). A model that keeps all its stages in one child
(timm's `stages`) gets two candidates from it: NHWC or NCHW throughout.
"""

import copy
from time import perf_counter

import torch
import torch.nn.functional as F
from torch import nn

from tract_bench import smallmap


def timed_here(device, amp_dtype, deterministic=False) -> bool:
    """Whether `channels_last: auto` times the layout: on a CPU, unless runs must repeat bit for bit (the choice
    could differ between runs) or in fp16, which a CPU runs about 100x slower than fp32 (ResNet-18 at batch 20:
    19 s a step), so that timing would take minutes. Elsewhere NHWC throughout."""
    return torch.device(device).type == "cpu" and not deterministic and amp_dtype != torch.float16


def switch_points(model: nn.Module) -> list[str]:
    """The model's top-level children that hold a 2-d convolution: where NCHW may take over from NHWC. The first
    one means NCHW throughout (its input is converted too)."""
    return [name for name, child in model.named_children() if any(isinstance(m, nn.Conv2d) for m in child.modules())]


def _to_nchw(module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def apply(model: nn.Module, nchw_from: str | None) -> nn.Module:
    """Lay `model` out NHWC before its child `nchw_from` and NCHW from that child on (None: NHWC throughout); a
    hook converts the activations where the layout changes. Applying again replaces the earlier layout."""
    names = [name for name, _ in model.named_children()]
    if nchw_from is not None and nchw_from not in names:
        raise ValueError(f"{type(model).__name__} has no child {nchw_from!r} to switch to NCHW at; it has {names}")
    for child in model.children():  # found by identity, so also in a deep copy, whose handles would be stale
        for key in [k for k, hook in child._forward_pre_hooks.items() if hook is _to_nchw]:
            del child._forward_pre_hooks[key]
    model.to(memory_format=torch.channels_last)
    if nchw_from is not None:
        for name in names[names.index(nchw_from):]:
            model.get_submodule(name).to(memory_format=torch.contiguous_format)
        model.get_submodule(nchw_from).register_forward_pre_hook(_to_nchw)
    return model


def describe(model: nn.Module, nchw_from: str | None) -> str:
    """The layout in words: 'channels_last', 'nchw' or 'channels_last (nchw from layer3)', with ', 2x2 maps as
    matmuls' where tract_bench.smallmap converted convolutions."""
    if nchw_from is None:
        name = "channels_last"
    else:
        name = "nchw" if nchw_from == switch_points(model)[0] else f"channels_last (nchw from {nchw_from})"
    if any(isinstance(m, smallmap.SmallMapConv2d) for m in model.modules()):
        name += ", 2x2 maps as matmuls"
    return name


def _step(model, x, y, amp_dtype):
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()


def tune(model: nn.Module, batch_shape: tuple, num_classes: int, amp_dtype=None, rounds: int = 2) -> str | None:
    """The `nchw_from` (see `apply`) whose forward and backward (in eager mode) are fastest on a random batch of
    `batch_shape`, timed on a CPU on a copy of the model: every candidate in turn in each of `rounds` rounds after
    an untimed round (oneDNN builds its kernels on first use), best time each. The model, its BatchNorm statistics
    and the random state stay as they were."""
    candidates = [None] + switch_points(model)
    if len(candidates) == 1:
        return None
    trial = copy.deepcopy(model).train()
    for m in trial.modules():  # this process times alone: no all-reduce of TrAct's Gram with other ranks
        if hasattr(m, "tract_sync_gram"):
            m.tract_sync_gram = False
    g = torch.Generator().manual_seed(0)  # a generator of its own: the caller's random state stays as it was
    x = torch.randn(batch_shape, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(num_classes, batch_shape[:1], generator=g)
    best = {c: float("inf") for c in candidates}
    with torch.random.fork_rng(devices=[]):  # dropout, stochastic depth
        for r in range(rounds + 1):
            for c in candidates:
                apply(trial, c)
                t0 = perf_counter()
                _step(trial, x, y, amp_dtype)
                if r:
                    best[c] = min(best[c], perf_counter() - t0)
    return min(candidates, key=best.get)


def auto(model: nn.Module, batch_shape: tuple, num_classes: int, amp_dtype=None,
         nchw_from: str | None = "auto") -> str | None:
    """`channels_last: auto` for a model on its device (the CPU or a GPU), as a fresh tract-train run applies it:
    on a CPU in fp32, 3x3 convolutions on 2x2 maps as matrix products (tract_bench.smallmap); then the layout `tune`
    times fastest where `timed_here`, else NHWC throughout, or the given `nchw_from` (a TrAct twin takes its
    baseline's). Returns the `nchw_from` applied."""
    device = next(model.parameters()).device
    if smallmap.used_here(device, amp_dtype):
        smallmap.convert(model, batch_shape[1:])
    if nchw_from == "auto":
        nchw_from = tune(model, batch_shape, num_classes, amp_dtype) if timed_here(device, amp_dtype) else None
    apply(model, nchw_from)
    return nchw_from
