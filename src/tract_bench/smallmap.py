"""Plain 3x3 convolutions (stride 1, padding 1) on 2x2 feature maps as one matrix product, on a CPU in fp32.

With padding 1, every output position of a 3x3 convolution on a 2x2 map sees every input position, so the layer is
a dense linear map from the 4*C_in input values of an image to its 4*C_out outputs: y = x M, with M assembled
from the kernel taps (the tap at output (i, j) for input (p, q) is (p - i + 1, q - j + 1)). oneDNN's convolution
kernels handle such tiny maps badly: on the 2-core Intel Xeon of results/README.md, forward and backward of the
paper's CIFAR ResNet-18 layer4 convolution (512 -> 512 channels, batch 128) took 45 ms in NCHW and 90 ms in NHWC,
against 22 ms as matrix products, which also do 2.25x fewer multiplications (no zero padding). The values are the
same up to float rounding.

`convert` gives this forward to the eligible nn.Conv2d layers of a model that see 2x2 maps at its input size. It
falls back to the convolution for any other input (larger maps, a GPU, autocast, a dtype other than fp32).
Only the class changes (as tract.py does for TrAct's layer): parameters, state dict and hooks stay.
"""

import torch
from torch import nn

# (i, j, p, q): output position (i, j) reads input position (p, q) through kernel tap (p - i + 1, q - j + 1)
_PAIRS = [(i, j, p, q) for i in range(2) for j in range(2) for p in range(2) for q in range(2)]


def _format(t: torch.Tensor):
    """The memory format `t` is laid out in: channels_last or NCHW (contiguous)."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


class _Dense2x2(torch.autograd.Function):
    """y = conv2d(x, w, padding=1) for x of shape (N, C_in, 2, 2), as one matrix product with M^T of shape
    (4*C_out, 4*C_in). Rows and columns run over (position, channel), i.e. NHWC order: views of channels_last
    tensors, copies of NCHW ones. The backward forms the gradient of M^T with one product and sums its 16 blocks
    into the 9 taps. The output and gradients come back in the memory format of x and w, as the convolution's do."""

    @staticmethod
    def forward(ctx, x, w):
        n, (c_out, c_in) = x.shape[0], w.shape[:2]
        taps = w.permute(0, 2, 3, 1)  # (C_out, 3, 3, C_in)
        mt = w.new_empty(2, 2, c_out, 2, 2, c_in)
        for i, j, p, q in _PAIRS:
            mt[i, j, :, p, q] = taps[:, p - i + 1, q - j + 1]
        mt = mt.view(4 * c_out, 4 * c_in)
        xf = x.permute(0, 2, 3, 1).reshape(n, 4 * c_in)
        ctx.save_for_backward(xf, mt)
        ctx.formats = _format(x), _format(w)
        return (xf @ mt.t()).view(n, 2, 2, c_out).permute(0, 3, 1, 2).contiguous(memory_format=ctx.formats[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is no function of w that autograd sees
    def backward(ctx, grad):
        xf, mt = ctx.saved_tensors
        n, c_out, c_in = grad.shape[0], mt.shape[0] // 4, mt.shape[1] // 4
        gf = grad.permute(0, 2, 3, 1).reshape(n, 4 * c_out)
        x_format, w_format = ctx.formats
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gf @ mt).view(n, 2, 2, c_in).permute(0, 3, 1, 2).contiguous(memory_format=x_format)
        grad_w = None
        if ctx.needs_input_grad[1]:
            gmt = (gf.t() @ xf).view(2, 2, c_out, 2, 2, c_in)
            taps = xf.new_zeros(c_out, 3, 3, c_in)
            for i, j, p, q in _PAIRS:
                taps[:, p - i + 1, q - j + 1] += gmt[i, j, :, p, q]
            grad_w = taps.permute(0, 3, 1, 2).contiguous(memory_format=w_format)
        return grad_x, grad_w


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d whose forward takes the matrix product on a 2x2 map on a CPU in fp32 without autocast."""

    def forward(self, x):
        if (x.dim() == 4 and x.shape[-2:] == (2, 2) and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            y = _Dense2x2.apply(x, self.weight)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        return super().forward(x)


def used_here(device, amp_dtype) -> bool:
    """Whether `channels_last: auto` converts a model: on a CPU without autocast, the only place the matrix-product
    path runs (elsewhere every call would fall back to the convolution)."""
    return torch.device(device).type == "cpu" and amp_dtype is None


def eligible(m: nn.Module) -> bool:
    """A plain 3x3 convolution, stride 1, zero padding 1, no dilation or groups (exact type: a subclass may compute
    something else)."""
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def convert(model: nn.Module, input_shape: tuple) -> int:
    """Give SmallMapConv2d's forward to each eligible convolution of `model` that sees a 2x2 map when the model
    reads images of `input_shape` (C, H, W), found by one forward pass of 2 images in eval mode (BatchNorm
    statistics stay as they were, every module's mode is restored); returns how many."""
    p = next(model.parameters(), None)
    if p is None:
        return 0
    seen = set()

    def record(m, args):
        if args and args[0].shape[-2:] == (2, 2):
            seen.add(m)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if eligible(m)]
    training = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in training.items():
            m.train(mode)
    for m in seen:
        m.__class__ = SmallMapConv2d
    return len(seen)
