"""Where one training step's time goes, and how close it runs to the device's rate on large dense products.

The step is bench_tract.py's (forward, backward, SGD on one fixed synthetic batch, so no data pipeline) with
tract-train's defaults for the device: the `channels_last: auto` layout (on a CPU the one timed fastest, with
3x3 convolutions on 2x2 maps as matrix products); bf16 autocast on CUDA from Ampere on, fp32 on CPU, where freed
memory is kept for reuse as a CPU run does. Printed:
  - the step's floating-point work as run (torch.utils.flop_counter: convolutions and matrix products, forward and
    backward; a 2x2-map matrix product counts its 16 multiply-adds per output and input channel, not the padded
    convolution's 36, so a CPU ResNet-18 step at batch 128 counts about 12 GFLOP fewer than before that path),
    its median time, and the rate that makes;
  - the device's rate on a large square matrix product and on a large 3x3 convolution (in the faster layout) in
    the step's precision: the practical ceiling of a step whose time is convolutions and matrix products. A step
    near it can only get faster by doing less work (fewer FLOPs, lower precision), not by a better loop;
  - torch.profiler's ops by self time (device time on CUDA).

  python scripts/step_profile.py [--model resnet18_cifar] [--tract] [--steps 10] [--top 15] [--out FILE]
"""

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from bench_tract import LAM, LR, MODELS, MOMENTUM, place, setup, sync, timed, train_step, training_device
from tract_bench import layout
from tract_bench.config import resolve_precision
from tract_bench.tract import apply_tract
from tract_bench.train import AUTOCAST, device_name


def best_rate(fn, flops, device, reps=5) -> float:
    """FLOP/s of fn (which does `flops` of work): median over `reps` timings after two warm-ups. On a GPU each
    timing covers 20 back-to-back calls, so that one call's tens of microseconds are not lost in the host's
    synchronisation."""
    calls = 20 if device.type == "cuda" else 1

    def repeated():
        for _ in range(calls):
            fn()

    times = [timed(repeated, device) for _ in range(reps + 2)][2:]
    return calls * flops / statistics.median(times)


def dense_rates(device, dtype) -> dict:
    """The device's rate on two large dense products in the step's precision: a square matrix product, and a
    3x3 convolution (batch 128, 256 -> 256 channels, 16x16, in the faster of NHWC and NCHW), which the CPU's
    oneDNN can run faster than its matrix product."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(128, 256, 16, 16, device=device, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)

    def conv_rate(memory_format):
        xf, wf = x.contiguous(memory_format=memory_format), w.contiguous(memory_format=memory_format)
        return best_rate(lambda: F.conv2d(xf, wf, padding=1), 2 * x.numel() * 256 * 9, device)

    with torch.no_grad():
        return {"matmul": best_rate(lambda: a @ b, 2 * size**3, device),
                "conv3x3": max(conv_rate(torch.channels_last), conv_rate(torch.contiguous_format))}


def profile_step(model_name, tract, steps, warmup, batch, device) -> dict:
    precision = resolve_precision("auto", device)
    amp_dtype = AUTOCAST[precision]
    model, x, y = setup(model_name, batch, device)
    if tract:
        apply_tract(model, LAM, input_size=tuple(x.shape[1:]))
    nchw_from = place(model, model_name, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def step():
        train_step(model, optimizer, scaler, x, y, amp_dtype)

    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = statistics.median(timed(step, device) for _ in range(steps))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    flops = counter.get_total_flops()
    dense = dense_rates(device, amp_dtype or torch.float32)
    return {"device": device_name(device), "model": model_name, "tract": tract, "batch": x.shape[0],
            "precision": f"{precision}+{layout.describe(model, nchw_from)}",
            "flops_per_step": flops, "ms_per_step": 1000 * seconds, "images_per_second": x.shape[0] / seconds,
            "gflops_achieved": flops / seconds / 1e9, "gflops_matmul": dense["matmul"] / 1e9,
            "gflops_conv3x3": dense["conv3x3"] / 1e9, "profile": prof.key_averages()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="resnet18_cifar")
    p.add_argument("--tract", action="store_true", help=f"TrAct (lambda={LAM}) on the first layer")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median over them)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, help="override the model's batch size (quick checks only)")
    p.add_argument("--top", type=int, default=15, help="rows of the profiler's table")
    p.add_argument("--out", help="also append the report to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.top < 1 or (args.batch is not None and args.batch < 1):
        p.error("--steps, --top and --batch must be >= 1, --warmup >= 0")
    device = training_device()
    r = profile_step(args.model, args.tract, args.steps, args.warmup, args.batch, device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    best = max(r["gflops_matmul"], r["gflops_conv3x3"])
    report = (f"{r['profile'].table(sort_by=sort, row_limit=args.top, max_name_column_width=40)}\n"
              f"{r['model']}{' + TrAct' if r['tract'] else ''}, batch {r['batch']}, {r['precision']} on "
              f"{r['device']}, torch {torch.__version__}:\n"
              f"  step: {r['flops_per_step'] / 1e9:.1f} GFLOP in {r['ms_per_step']:.1f} ms (median of {args.steps}) "
              f"= {r['gflops_achieved']:.0f} GFLOP/s, {r['images_per_second']:.0f} images/s\n"
              f"  large dense products in {r['precision'].split('+')[0]}: matrix product {r['gflops_matmul']:.0f} "
              f"GFLOP/s, 3x3 convolution {r['gflops_conv3x3']:.0f} GFLOP/s; the step runs at "
              f"{100 * r['gflops_achieved'] / best:.0f} % of the faster\n")
    print(report, end="", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(report)
    return r


if __name__ == "__main__":
    main()
