"""How far autocast's weight gradients are from fp32's: one batch, one initialisation, relative L2 error per tensor.

ResNet-18 (the paper's CIFAR variant, in NHWC as tract-train runs it on a GPU) at its initialisation, one batch of
N(0, 1) images with random labels. For bf16 and fp16 autocast it prints the median and largest relative error
||g - g_fp32|| / ||g_fp32|| over the parameter tensors, and the stem conv's; for scale, fp32 in NCHW against
fp32 in NHWC (the same arithmetic in another order). Errors far above the format's rounding (bf16 0.4 %,
fp16 0.05 %) mean the gradient is a sum with heavy cancellation.

  python scripts/grad_precision.py [--batch 64] [--seed 0]
"""

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

from tract_bench.models import resnet_cifar


def weight_grads(model, x, y, amp_dtype=None) -> dict:
    model = copy.deepcopy(model)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return {name: p.grad.float() for name, p in model.named_parameters()}


def relative_errors(grads: dict, reference: dict) -> dict:
    return {name: float((grads[name] - g).norm() / g.norm()) for name, g in reference.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = resnet_cifar("resnet18", 10).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    reference = weight_grads(model, x, y)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    errors = {"fp32 NCHW": relative_errors(weight_grads(nchw, x.contiguous(), y), reference)}
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        errors[label] = relative_errors(weight_grads(model, x, y, dtype), reference)
    for label, e in errors.items():
        print(f"{label:10s} median {100 * statistics.median(e.values()):6.2f} %  max {100 * max(e.values()):6.2f} %"
              f"  stem conv {100 * e['conv1.weight']:6.2f} %", flush=True)
    return errors


if __name__ == "__main__":
    main()
