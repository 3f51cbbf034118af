"""Diagnostic for bench_train.py's accuracy check: train one loop on the other loop's batches.

When the fast loop and the reference loop end at different test accuracies, the cause is either the data
pipeline (DeviceLoader vs PIL transforms in DataLoader workers) or the training step (the fast loop's layout and
LambdaLR vs a contiguous model and CosineAnnealingLR). This trains, from the same initialisation per seed as
bench_train.py's --accuracy-seeds, either the reference loop on the fast loop's batches (same order and
augmentation as the fast loop's run with that seed) or the fast loop on the reference loop's batches, and
prints the final test top-1 of each seed (baseline ResNet-18).

  python scripts/swap_pipelines.py ref_on_fast_data --seeds 0 1 2 [--epochs 4] [--train-subset 10000]
"""

import argparse
import os
from itertools import islice

import torch

from bench_train import build_loops, load_data
from tract_bench.data import balanced_subset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["ref_on_fast_data", "fast_on_ref_data"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, help="class-balanced training subset (as --accuracy-train-subset)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=os.environ.get("TRACT_DATA", "data"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data, real = load_data(args.data)
    if not real:
        p.error("needs the real CIFAR-10: pass --data or set TRACT_DATA")
    if args.train_subset:
        data.train_x, data.train_y = balanced_subset(data.train_x, data.train_y, args.train_subset,
                                                     data.num_classes)
    steps = len(data.train_x) // args.batch_size
    args.precision, args.compile = "auto", False  # the fast loop as bench_train builds it by default
    results = []
    for seed in args.seeds:
        # bench_train's own loops for this seed (same initialisation and data streams); the baseline pair
        loops = build_loops(args, ["resnet18_cifar"], data, device, args.epochs * steps, seed)
        fast, ref = loops["resnet18_cifar", "baseline", "fast"], loops["resnet18_cifar", "baseline", "reference"]
        trainer, source = (ref, fast) if args.mode == "ref_on_fast_data" else (fast, ref)
        for _ in range(args.epochs):
            epoch = source.batches()
            # the reference loop trains in the contiguous layout it always uses
            trainer.train((x.contiguous() if trainer is ref else x, y) for x, y in islice(epoch, steps))
            epoch.close()
        results.append(trainer.test_top1())
        print(f"{args.mode}  seed {seed}  test top-1 {results[-1]:.2f} %", flush=True)
    return results


if __name__ == "__main__":
    main()
