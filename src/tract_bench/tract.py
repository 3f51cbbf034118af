"""TrAct: train the first layer's pre-activations, not its weights (Petersen et al., NeurIPS 2024).

For a first layer z = W a + c over patch rows a (A: rows x n, the unfolded input; rows = images x output
positions for a Conv2d, images x tokens for a Linear), TrAct keeps the forward pass, the bias gradient and
the input gradient, and replaces only the weight gradient:

    grad_W_tract = grad_W @ (A^T A / rows + lam * I_n)^-1        grad_W = dL/dW = dL/dz^T @ A

This is the closed-form weight step that moves z best along -dL/dz (paper, Lemma 1), so the first layer
learns at a speed independent of pixel contrast. The optimizer, other layers and inference are unchanged.

How it is wired: the layer stays the same object with the same Parameters (state_dicts are interchangeable
with a plain model); only its class becomes a thin subclass whose forward routes the weight through an
identity autograd function. In backward that function receives grad_W from the framework's own conv/linear
kernel (in the autocast dtype, cast back to the weight's dtype) and right-multiplies it by the inverse of the
regularised Gram matrix, with autocast switched off. The Gram is accumulated in float32 (float64 for float64
weights) over chunks of the unfolded input of at most `chunk_bytes` (or one output row, if larger), so a 224^2
ImageNet stem never unfolds whole; the n x n system is solved by a float64 Cholesky, never inverted. n is small
(27 for a CIFAR stem, 147 for a 7x7 stem, 768 for a ViT-B patch), so this n x n form is exact and cheap whether
rows >= n or rows < n; TrAct adds rows * n^2 FLOPs for the Gram and one n x n solve per step.

Semantics under gradient accumulation and DDP: each backward pass (micro-batch) preconditions its own
gradient with its own Gram, and DDP then averages the preconditioned per-rank gradients, as the reference
implementation implicitly does. With `sync_gram=True` the Gram and row count are all-reduced first, so
every rank uses the global batch's Gram. A layer called several times in one forward preconditions each
call's contribution with that call's input.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 64 * 2**20


def _conv_geometry(conv: nn.Conv2d) -> tuple:
    """What the Gram needs of a Conv2d, as plain values (traceable by torch.compile)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return (tuple(conv._reversed_padding_repeated_twice), mode, conv.kernel_size, conv.stride, conv.dilation)


def _conv_patch_chunks(x: torch.Tensor, geometry: tuple, dtype: torch.dtype, chunk_bytes: int):
    """Yield the unfolded conv input as (g, n, L) blocks of at most `chunk_bytes` bytes each.

    The input is padded exactly as Conv2d pads it (zeros, reflect, replicate, circular; 'same' included),
    then unfolded without padding. Blocks are whole images when one image fits, else bands of output rows.
    """
    padding, mode, (kh, kw), (sh, sw), (dh, dw) = geometry
    h_in, w_in = x.shape[2] + padding[2] + padding[3], x.shape[3] + padding[0] + padding[1]
    h_out, w_out = (h_in - dh * (kh - 1) - 1) // sh + 1, (w_in - dw * (kw - 1) - 1) // sw + 1
    row_bytes = w_out * x.shape[1] * kh * kw * torch.finfo(dtype).bits // 8  # one output row of one image
    band = max(1, chunk_bytes // row_bytes)  # output rows per block
    unfold = dict(kernel_size=(kh, kw), dilation=(dh, dw), stride=(sh, sw))

    def pad(xs):
        return F.pad(xs.to(dtype), padding, mode=mode)

    if band >= h_out:  # whole images per block
        per_block = band // h_out
        for i in range(0, x.shape[0], per_block):
            yield F.unfold(pad(x[i : i + per_block]), **unfold)
        return
    for i in range(x.shape[0]):  # one image is over the bound: bands of output rows
        xi = pad(x[i : i + 1])
        for r in range(0, h_out, band):
            r_end = min(r + band, h_out)
            yield F.unfold(xi[:, :, r * sh : (r_end - 1) * sh + dh * (kh - 1) + 1], **unfold)


def _linear_patch_chunks(x: torch.Tensor, dtype: torch.dtype, chunk_bytes: int):
    """Yield the rows of a Linear's input (..., n) as (1, n, rows) blocks of at most `chunk_bytes` bytes."""
    a = x.reshape(-1, x.shape[-1])
    per_block = max(1, chunk_bytes // (a.shape[1] * torch.finfo(dtype).bits // 8))
    for i in range(0, a.shape[0], per_block):
        yield a[i : i + per_block].to(dtype).T.unsqueeze(0)


def gram(x: torch.Tensor, geometry: tuple | None, dtype: torch.dtype, chunk_bytes: int):
    """A^T A of a layer's unfolded input, accumulated over bounded chunks, and the number of rows of A.

    `geometry` is `_conv_geometry(conv)` for a Conv2d, None for a Linear.
    """
    if geometry is not None:
        chunks = _conv_patch_chunks(x, geometry, dtype, chunk_bytes)
    else:
        chunks = _linear_patch_chunks(x, dtype, chunk_bytes)
    g, rows = None, 0
    for u in chunks:  # u: (blocks, n, positions)
        part = torch.matmul(u, u.transpose(1, 2)).sum(0)
        g = part if g is None else g + part
        rows += u.shape[0] * u.shape[2]
    return g, rows


class _PreconditionWeightGrad(torch.autograd.Function):
    """Identity on the weight in forward; in backward, grad_W -> grad_W (A^T A / rows + lam I)^-1."""

    @staticmethod
    def forward(ctx, weight, x, geometry, lam, chunk_bytes, sync_gram):
        ctx.save_for_backward(x)
        ctx.geometry, ctx.lam, ctx.chunk_bytes, ctx.sync_gram = geometry, lam, chunk_bytes, sync_gram
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_w):
        (x,) = ctx.saved_tensors
        # Autocast may be active in backward (backward() called inside the autocast block): switch it off so
        # the Gram and the solve run at the precision chosen here, never in bf16/fp16.
        with torch.autocast(x.device.type, enabled=False):
            return _precondition(grad_w, x.detach(), ctx), None, None, None, None, None


def _precondition(grad_w, x, ctx):
    # The Gram in float32 (float64 for float64 weights); the n x n solve always in float64: it is tiny, and
    # (A^T A/rows + lam I) can have a condition number in the thousands (few rows, large patches), where a
    # float32 Cholesky would lose four digits.
    g, rows = gram(x, ctx.geometry, torch.promote_types(grad_w.dtype, torch.float32), ctx.chunk_bytes)
    g = g.double()
    if ctx.sync_gram and dist.is_available() and dist.is_initialized():
        rows_t = torch.tensor([float(rows)], device=g.device, dtype=g.dtype)
        dist.all_reduce(g)
        dist.all_reduce(rows_t)
        rows = rows_t  # stays a tensor: no host sync in backward
    m = g / rows + ctx.lam * torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
    g2d = grad_w.reshape(grad_w.shape[0], -1).double()
    # grad_W M^-1 = (M^-1 grad_W^T)^T since M is symmetric positive definite.
    # cholesky_ex: M is positive definite by construction (lam > 0), so skip the error check and its host sync.
    out = torch.cholesky_solve(g2d.T, torch.linalg.cholesky_ex(m).L).T
    return out.reshape(grad_w.shape).to(grad_w.dtype)


def _tract_weight(layer, x, geometry):
    return _PreconditionWeightGrad.apply(layer.weight, x, geometry, layer.tract_lam, layer.tract_chunk_bytes,
                                         layer.tract_sync_gram)


class TrActConv2d(nn.Conv2d):
    """An nn.Conv2d whose weight gradient is TrAct's; created in place by `TrAct(conv)`."""

    def forward(self, x):
        return self._conv_forward(x, _tract_weight(self, x, _conv_geometry(self)), self.bias)


class TrActLinear(nn.Linear):
    """An nn.Linear whose weight gradient is TrAct's; created in place by `TrAct(linear)`."""

    def forward(self, x):
        return F.linear(x, _tract_weight(self, x, None), self.bias)


# Exact types only: a subclass (timm's Conv2dSame, StdConv2d, ...) may compute something else in forward.
_TRACT_CLASS = {nn.Conv2d: TrActConv2d, nn.Linear: TrActLinear, TrActConv2d: TrActConv2d, TrActLinear: TrActLinear}


def TrAct(layer: nn.Module, lam: float = 0.1, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
          sync_gram: bool = False, name: str = "layer") -> nn.Module:
    """Make `layer` (an nn.Conv2d or nn.Linear) train with TrAct at `lam`; returns the same object.

    The layer keeps its identity, Parameters and state_dict keys; `isinstance(layer, nn.Conv2d)` stays true.
    Applying it again only updates the settings. Cases it cannot compute exactly are refused with a
    ValueError naming the layer (`name`) and the reason.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"TrAct on {name}: lam must be a finite number > 0, got {lam!r}")
    if int(chunk_bytes) < 1:
        raise ValueError(f"TrAct on {name}: chunk_bytes must be >= 1, got {chunk_bytes!r}")
    tract_class = _TRACT_CLASS.get(type(layer))
    if tract_class is None:
        raise ValueError(
            f"TrAct on {name}: {type(layer).__module__}.{type(layer).__qualname__} is not a plain nn.Conv2d or "
            "nn.Linear, so its forward may differ from F.conv2d/F.linear; pick another layer with tract.layer=...")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f"TrAct on {name}: grouped convolutions (groups={layer.groups}) are not supported")
    if not layer.weight.requires_grad:
        raise ValueError(f"TrAct on {name}: its weight is frozen (requires_grad=False); unfreeze it first")
    layer.__class__ = tract_class
    layer.tract_lam, layer.tract_chunk_bytes, layer.tract_sync_gram = float(lam), int(chunk_bytes), sync_gram
    return layer


def find_first_layer(model: nn.Module, input_size=(3, 32, 32)) -> str:
    """Dotted path of the model's first layer: timm's pretrained_cfg['first_conv'], else the first
    Conv2d/Linear that runs in a forward pass on a dummy input of `input_size` (C, H, W)."""
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first_conv, str):
        try:
            model.get_submodule(first_conv)
            return first_conv
        except AttributeError:
            pass  # some timm configs name a layer the model does not have; fall back to tracing
    names = {m: n for n, m in model.named_modules()}
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        p = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("TrAct: no Conv2d or Linear ran in a forward pass; name the layer with tract.layer=...")
    return order[0]


def apply_tract(model: nn.Module, lam: float = 0.1, layer: str | None = None, *, input_size=(3, 32, 32),
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, sync_gram: bool = False) -> str:
    """Apply TrAct in place to the model's first layer (or the one at dotted path `layer`); return its path."""
    path = layer or find_first_layer(model, input_size)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"TrAct: the model has no layer {path!r}; check tract.layer") from None
    TrAct(module, lam, chunk_bytes=chunk_bytes, sync_gram=sync_gram, name=path)
    return path
