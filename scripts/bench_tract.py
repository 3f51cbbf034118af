"""TrAct's cost per training step: the same model trained with and without TrAct, interleaved in one process.

Each model is built once; its TrAct twin is a deep copy with TrAct (lambda=0.1) on the first layer, so both
start from the same weights. A full step is forward, backward and optimizer.step (SGD, momentum 0.9) on one
fixed synthetic batch of the model's input shape, so the data pipeline is out of the picture. Baseline and
TrAct steps alternate in ABBA order (B T T B B T ...), so drift, thermal state and other processes on the
machine hit both alike; the report is the median step time of each after --warmup untimed steps per side.

Models: the paper's CIFAR ResNet-18 (3x3 stem, n=27, batch 128, 32^2), the CIFAR ViT (patch 4, n=48, batch
128) and an ImageNet ResNet-50 (7x7 stem, n=147, 224^2; batch 32 on CPU, 256 on CUDA), in tract-train's default
layout: NHWC on CUDA; on a CPU the one tract_bench.layout times fastest for the baseline, which its TrAct twin
gets too, so that the overhead is TrAct's alone. On CUDA: bf16 autocast, then fp16 autocast with a GradScaler; on
CPU: fp32, with freed memory kept for reuse as a CPU run keeps it.

Targets (printed PASS/MISS, never asserted): TrAct overhead <= 3 % on the CIFAR ResNet-18 and <= 2 % on the
CIFAR ViT. (The paper reports +9.7 % for its CIFAR ViT and 0.08-0.25 % for ImageNet ViTs, paper section 4.6.)
`noise_pct` is the baseline's interquartile range over its median: overheads below it are not resolved.

  python scripts/bench_tract.py [--steps 30] [--warmup 5] [--models resnet18_cifar vit_cifar] [--out PATH]
"""

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from tract_bench import layout
from tract_bench.allocator import keep_freed_memory
from tract_bench.config import default_channels_last
from tract_bench.models import ViTCifar, resnet_cifar
from tract_bench.tract import apply_tract
from tract_bench.train import device_name

# ---- settings ----
LAM = 0.1
LR, MOMENTUM = 0.01, 0.9  # a step costs the same at any lr; a small one keeps the weights finite
SEED = 0
MODELS = {  # name: (builder, classes, image size, batch on CPU, batch on CUDA)
    "resnet18_cifar": (lambda: resnet_cifar("resnet18", 10), 10, 32, 128, 128),
    "vit_cifar": (lambda: ViTCifar(10), 10, 32, 128, 128),
    "resnet50_imagenet": (lambda: torchvision.models.resnet50(), 1000, 224, 32, 256),
}
TARGETS = {"resnet18_cifar": 3.0, "vit_cifar": 2.0}  # max overhead, percent
PRECISIONS = {  # device type: [(label, autocast dtype, GradScaler)]
    "cuda": [("bf16", torch.bfloat16, False), ("fp16+GradScaler", torch.float16, True)],
    "cpu": [("fp32", None, False)],
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_device() -> torch.device:
    """The GPU if there is one, else the CPU, set up as a tract-train run sets it up: on a CPU freed memory is
    kept for reuse; cuDNN benchmarks its kernels for the fixed shapes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    torch.backends.cudnn.benchmark = True
    return device


def timed(fn, device) -> float:
    """Seconds that fn() takes, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def setup(name, batch, device):
    """MODELS[name] built from SEED (on the CPU, for the caller to wrap, then `place`) and one fixed synthetic batch
    for it on `device`, in the layout tract-train's loader gives there: (model, x, y)."""
    build, classes, size, cpu_batch, cuda_batch = MODELS[name]
    batch = batch or (cuda_batch if device.type == "cuda" else cpu_batch)
    memory_format = torch.channels_last if default_channels_last(device) else torch.contiguous_format
    torch.manual_seed(SEED)
    model = build()
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return model, x, y


def place(model, name, x, nchw_from="auto") -> str | None:
    """Move the model to x's device (the CPU or a GPU) as tract-train's `channels_last: auto` sets it up there:
    NHWC on a GPU; on a CPU 2x2-map convolutions as matrix products and the layout timed fastest, or `nchw_from`
    where given (tract_bench.layout.auto). Returns its `nchw_from`."""
    return layout.auto(model.to(x.device).train(), tuple(x.shape), MODELS[name][1], nchw_from=nchw_from)


def train_step(model, optimizer, scaler, x, y, amp_dtype):
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def time_interleaved(models, x, y, amp_dtype, scaled, steps, warmup, device) -> list[list[float]]:
    """Seconds per step of each model, alternating which goes first: [[baseline...], [tract...]]."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    scalers = [torch.amp.GradScaler(device.type, enabled=scaled) for _ in models]
    times = [[] for _ in models]
    for i in range(warmup + steps):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            seconds = timed(lambda: train_step(models[k], optimizers[k], scalers[k], x, y, amp_dtype), device)
            if i >= warmup:
                times[k].append(seconds)
    return times


def bench_model(name, args, device) -> list[dict]:
    baseline, x, y = setup(name, args.batch, device)
    batch, size = x.shape[0], x.shape[-1]
    tract = copy.deepcopy(baseline)
    layer = apply_tract(tract, LAM, input_size=tuple(x.shape[1:]))
    n = tract.get_submodule(layer).weight[0].numel()
    nchw_from = place(baseline, name, x)
    place(tract, name, x, nchw_from)  # the baseline's layout: the overhead is TrAct's own
    models = [baseline, tract]
    layout_name = "+" + layout.describe(baseline, nchw_from)
    rows = []
    for label, amp_dtype, scaled in PRECISIONS[device.type]:
        base_t, tract_t = time_interleaved(models, x, y, amp_dtype, scaled, args.steps, args.warmup, device)
        base, tr = statistics.median(base_t), statistics.median(tract_t)
        q1, _, q3 = statistics.quantiles(base_t, n=4) if len(base_t) > 1 else (base, base, base)
        overhead = 100 * (tr / base - 1)
        target = TARGETS.get(name)
        rows.append({"device": device_name(device), "torch": torch.__version__, "model": name, "batch": batch,
                     "image_size": size, "precision": label + layout_name, "steps": args.steps,
                     "ms_step_baseline": round(1000 * base, 3), "ms_step_tract": round(1000 * tr, 3),
                     "overhead_pct": round(overhead, 2), "noise_pct": round(100 * (q3 - q1) / base, 2),
                     "tract_layer": layer, "tract_n": n, "target_pct": target if target is not None else "",
                     "check": "" if target is None else ("PASS" if overhead <= target else "MISS")})
        print(f"{name} {label}: baseline {1000 * base:.1f} ms, TrAct {1000 * tr:.1f} ms, {overhead:+.2f} %",
              flush=True)
    return rows


def markdown(rows) -> str:
    lines = [f"TrAct overhead per training step on {rows[0]['device']}, torch {rows[0]['torch']} "
             f"(median of {rows[0]['steps']} interleaved steps each)", "",
             "| model | n | batch | precision | baseline ms/step | TrAct ms/step | overhead | noise | target |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        target = f"<= {r['target_pct']} % {r['check']}" if r["check"] else ""
        lines.append(f"| {r['model']} | {r['tract_n']} | {r['batch']} | {r['precision']} | "
                     f"{r['ms_step_baseline']:.1f} | {r['ms_step_tract']:.1f} | {r['overhead_pct']:+.2f} % | "
                     f"{r['noise_pct']:.1f} % | {target} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per model and side (median over them)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, help="override every model's batch size (quick checks only)")
    p.add_argument("--out", default="results/bench_tract.csv")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    device = training_device()  # with the same shapes every step, both twins get the same kernels
    rows = [row for name in args.models for row in bench_model(name, args, device)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + markdown(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
