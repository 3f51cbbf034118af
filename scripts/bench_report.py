"""bench_train.py's results: one row per (model, method, loop), the targets checked against them, and the Markdown
report with the accuracy table. Targets are measured and printed PASS/MISS, never asserted."""

import csv
import platform
import statistics
from pathlib import Path

import torch
import torchvision

from tract_bench.train import device_name

CIFAR_TRAIN = 50_000  # CIFAR-10's training images: an epoch at a measured rate
CPU_MIN_RATIO = 1.2  # fast / reference on ResNet-18, this 2-core machine
GPU_MIN_RATIO, GPU_MAX_EPOCH_S, GPU_MAX_OVERHEAD = 3.0, 1.5, 3.0  # H200: x reference, s per epoch, TrAct overhead %


def paired(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[i] / b[i]: runs of one repetition were close in time, so drift cancels."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarise(ips: dict, labels: dict, args, device, data_label, timing) -> list[dict]:
    """One row per (model, method, loop) of `ips` (images/s per repetition); `labels`: the fast loops' settings."""
    rows = []
    for (name, method, loop), rates in ips.items():
        rate = statistics.median(rates)
        ratio = paired(rates, ips[name, method, "reference"])
        overhead = 100 * (paired(ips[name, "baseline", loop], rates) - 1) if method == "tract" else None
        rows.append({
            "device": device_name(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "data": data_label, "model": name, "method": method, "loop": loop,
            "precision": labels[name, method] if loop == "fast" else "fp32",
            "batch": args.batch_size, "timing": timing, "images_per_s": round(rate, 1),
            # a CIFAR-10 training epoch (390 steps of 128) at this rate
            "epoch_s": round((CIFAR_TRAIN // args.batch_size) * args.batch_size / rate, 3),
            "ratio_to_reference": round(ratio, 3),
            "tract_overhead_pct": "" if overhead is None else round(overhead, 2)})
    return rows


def check_targets(rows: list[dict], device) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target that applies to this device and these models."""
    by = {(r["model"], r["method"], r["loop"]): r for r in rows}
    checks = []
    for method in ("baseline", "tract"):
        fast = by.get(("resnet18_cifar", method, "fast"))
        if fast is None:
            continue
        name = f"ResNet-18 {method} (fast loop: {fast['precision']})"  # targets are set for the default settings
        if device.type == "cuda":
            checks.append((f"{name}: fast >= {GPU_MIN_RATIO}x reference", f"{fast['ratio_to_reference']}x",
                           fast["ratio_to_reference"] >= GPU_MIN_RATIO))
            checks.append((f"{name}: CIFAR-10 epoch <= {GPU_MAX_EPOCH_S} s", f"{fast['epoch_s']} s",
                           fast["epoch_s"] <= GPU_MAX_EPOCH_S))
        else:
            checks.append((f"{name}: fast >= {CPU_MIN_RATIO}x reference", f"{fast['ratio_to_reference']}x",
                           fast["ratio_to_reference"] >= CPU_MIN_RATIO))
    if device.type == "cuda":
        for (name, method, loop), r in by.items():
            if method == "tract" and loop == "fast":
                checks.append((f"{name}: TrAct overhead (fast loop) <= {GPU_MAX_OVERHEAD} %",
                               f"{r['tract_overhead_pct']} %", r["tract_overhead_pct"] <= GPU_MAX_OVERHEAD))
    return checks


def accuracy_table(acc_rows) -> list[str]:
    """Mean +- std of test top-1 over seeds per (model, method, loop), and fast minus reference per (model, method)."""
    top1 = {}
    for r in acc_rows:
        top1.setdefault((r["model"], r["method"], r["loop"]), []).append(r["test_top1"])
    first = acc_rows[0]

    def mean_std(values):
        std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.2f}{std}"

    lines = ["", f"## Test top-1 after {first['epochs']} epochs on {first['train_images']} training images "
             f"({len(set(r['seed'] for r in acc_rows))} seed(s); mean ± std over seeds)", "",
             "| model | method | fast loop | reference loop | fast − reference | per seed (fast / reference) |",
             "|---|---|---:|---:|---:|---|"]
    for (name, method, loop), fast in top1.items():
        if loop != "fast":
            continue
        ref = top1[name, method, "reference"]
        seeds = ", ".join(f"{f:.2f} / {r:.2f}" for f, r in zip(fast, ref))
        lines.append(f"| {name} | {method} | {mean_std(fast)} | {mean_std(ref)} | "
                     f"{statistics.fmean(fast) - statistics.fmean(ref):+.2f} | {seeds} |")
    return lines


def header_lines(device, data_label, batch, timing, reuse) -> list[str]:
    """The report's setting: device, versions, data, timing and how the two loops' processes are set up."""
    return [f"- device: {device_name(device)}",
            f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
            f"- data: {data_label}; batch {batch}",
            f"- timing: {timing}; medians over reps of paired per-rep ratios",
            "- reference: PIL + torchvision transforms in DataLoader workers, fp32, loss.item() per step "
            "(scripts/reference_loop.py)",
            "- processes: the reference loops run in a process of their own, with the C allocator's defaults; "
            + ("the fast loop's process reuses freed memory, as tract-train's does on a CPU (tract_bench.allocator)"
               if reuse else "the fast loop's too")]


def markdown(rows, checks, acc_rows, header) -> str:
    lines = ["# Training throughput: tract-train's loop vs the official script's loop", "", *header, "",
             "| model | method | loop | precision | images/s | x reference | TrAct overhead | CIFAR-10 epoch |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        overhead = f"{r['tract_overhead_pct']:+.1f} %" if r["tract_overhead_pct"] != "" else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['loop']} | {r['precision']} | {r['images_per_s']:.0f} | "
                     f"{r['ratio_to_reference']:.2f} | {overhead} | {r['epoch_s']:.2f} s |")
    lines += ["", "Targets (PASS/MISS; measured, never asserted):", ""]
    lines += [f"- {'PASS' if ok else 'MISS'}  {target}: {value}" for target, value, ok in checks] or ["- none apply"]
    if acc_rows:
        lines += accuracy_table(acc_rows)
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
