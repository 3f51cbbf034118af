"""Diagnostic for bench_train.py's accuracy check: train one loop on the other loop's batches.

When the fast loop and the reference loop end at different test accuracies, the cause is either the data
pipeline (DeviceLoader vs PIL transforms in DataLoader workers) or the training step (channels_last model and
LambdaLR vs a contiguous model and CosineAnnealingLR). This trains, from the same initialisation per seed as
bench_train.py's --accuracy-seeds, either the reference loop on the fast loop's batches (same order and
augmentation as the fast loop's run with that seed) or the fast loop on the reference loop's batches, and
prints the final test top-1 of each seed.

  python scripts/swap_pipelines.py ref_on_fast_data --seeds 0 1 2 [--epochs 4] [--train-subset 10000]
"""

import argparse
import copy
import os
from itertools import islice

import torch

from bench_train import MODELS, FastLoop, ReferenceLoop, load_data
from reference_loop import TEST_TRANSFORM, TRAIN_TRANSFORM, CifarImages
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
    results = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = MODELS["resnet18_cifar"]()
        fast = FastLoop(copy.deepcopy(init), data, args.batch_size, device, args.epochs * steps, seed=seed)
        ref = ReferenceLoop(copy.deepcopy(init), CifarImages(data.train_x, data.train_y, TRAIN_TRANSFORM),
                            CifarImages(data.test_x, data.test_y, TEST_TRANSFORM), args.batch_size, device,
                            args.epochs * steps, seed=seed)
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
