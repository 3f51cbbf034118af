"""Training throughput: tract-train's loop vs a reference loop that mirrors the official TrAct CIFAR script.

For the paper's CIFAR ResNet-18 and the CIFAR ViT, each with and without TrAct (lambda=0.1), it measures
images/second over full training steps (data, forward, backward, optimizer, schedule) of two loops:

  fast       tract-train's loop: the uint8 set held on the device, DeviceLoader's batched crop + flip +
             normalisation, tract_bench.train.train_epoch (no per-step host sync), with tract-train's
             defaults: channels_last on CUDA, on a CPU channels_last up to the stage from which NCHW was
             timed faster (tract_bench.layout); bf16 autocast on Ampere or newer GPUs (fp16 on older ones),
             fp32 on CPU (--precision picks another, as precision= does). Optimizer and schedule
             from conf/optim/sgd_cosine.yaml.
  reference  scripts/reference_loop.py: PIL images through torchvision transforms in DataLoader workers,
             fp32, SGD momentum 0.9 lr 0.08, CosineAnnealingLR stepped per iteration, loss.item() per step.
             It runs in a process of its own, as the official script does: the fast loop's process is set up
             as tract-train sets up its own (on a CPU, glibc keeps freed memory for reuse), the reference's
             keeps the defaults.

Both read the same uint8 arrays with the same normalisation. Every (model, method, loop) trains its own
copy of one initialisation per model. A repetition runs each of them in turn (the loop order alternates
between repetitions) for --warmup untimed steps, then --steps timed steps, so drift on a busy machine hits
all of them alike; each reported ratio is the median over repetitions of that repetition's paired ratio.
--epochs E times E whole epochs per repetition instead, each a fresh pass over its loader (the reference
pays its worker start-up every epoch, as the official script does).

Targets (checked in bench_report.py and printed PASS/MISS, never asserted):
  CPU            fast >= 1.2x the reference loop on ResNet-18
  GPU (H200)     fast >= 3x the reference loop on ResNet-18; one ResNet-18 CIFAR-10 epoch (390 steps of 128)
                 <= 1.5 s; TrAct overhead in the fast loop <= 3 %
--accuracy-epochs N also trains every (model, method, loop) for N real epochs and reports its final test top-1,
so the report shows whether the fast path costs accuracy. --accuracy-seeds S repeats that for seeds 0..S-1
(seed k: one initialisation shared by the loops of a model, data order and augmentation from k) and the report
gives mean +- std over seeds, the yardstick for "within seed noise". --accuracy-models picks the models
(default --models); --accuracy-train-subset N trains on a class-balanced N-image subset (for a CPU; the test set
is always the whole 10,000).

Data: CIFAR-10 from --data, else $TRACT_DATA, else ./data (never downloaded); without it, synthetic uint8 data
of CIFAR-10's shape (fine for throughput, refused for --accuracy-epochs).

  python scripts/bench_train.py [--steps N] [--warmup N] [--reps N] [--epochs E] [--models ...]
                                [--accuracy-epochs N [--accuracy-seeds S] [--accuracy-train-subset N]
                                 [--accuracy-models ...]]
                                [--precision auto|fp32|bf16|fp16] [--compile] [--out-dir results]
"""

import argparse
import contextlib
import copy
import multiprocessing
import os
import time
from itertools import islice, product
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench_report import CIFAR_TRAIN, check_targets, header_lines, markdown, summarise, write_csv
from reference_loop import CifarImages, ReferenceLoop, TEST_TRANSFORM, TRAIN_TRANSFORM
from tract_bench import layout
from tract_bench.allocator import keep_freed_memory
from tract_bench.config import default_channels_last, resolve_precision
from tract_bench.data import ImageData, balanced_subset, load_cifar
from tract_bench.errors import UserError
from tract_bench.loader import DeviceLoader
from tract_bench.models import ViTCifar, resnet_cifar
from tract_bench.optim import build_optimizer, build_scheduler
from tract_bench.tract import apply_tract
from tract_bench.train import AUTOCAST, device_name, evaluate, train_epoch

# ---- settings ----
CONF = Path(__file__).resolve().parents[1] / "conf"
DATASET = OmegaConf.load(CONF / "dataset/cifar10.yaml")  # tract-train's CIFAR-10 preset: normalisation, augmentation
OPTIM = OmegaConf.load(CONF / "optim/sgd_cosine.yaml")  # tract-train's SGD-cosine preset (lr 0.08, momentum 0.9)
MODELS = {"resnet18_cifar": lambda: resnet_cifar("resnet18", 10), "vit_cifar": lambda: ViTCifar(10)}
METHODS = {"baseline": None, "tract": 0.1}  # TrAct's lambda
LOOPS = ("fast", "reference")
BATCH = 128
CIFAR_TEST = 10_000
EVAL_BATCH = 1000
SEED = 0
# Per device: a GPU step takes milliseconds, so it needs many steps per timing; a CPU step takes about a second.
DEFAULTS = {"cuda": dict(steps=200, warmup=20, reps=5), "cpu": dict(steps=10, warmup=2, reps=3)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FastLoop:
    """tract-train's path, as tract_bench.train.run wires it."""

    def __init__(self, model, data, batch, device, total_steps, precision="auto", compile_model=False, seed=SEED,
                 nchw_from="auto"):
        self.device = device
        self.amp_dtype = AUTOCAST[resolve_precision(precision, device)]
        channels_last = default_channels_last(device)
        self.model = model.to(device)
        self.nchw_from = None
        if channels_last:  # tract-train's channels_last: auto; a TrAct twin is given its baseline's layout
            shape = (batch, 3, DATASET.image_size, DATASET.image_size)
            self.nchw_from = layout.auto(self.model, shape, DATASET.num_classes, self.amp_dtype, nchw_from)
        # the settings in words, e.g. 'bf16+channels_last+compile'
        self.label = "+".join([resolve_precision(precision, device),
                               layout.describe(self.model, self.nchw_from) if channels_last else "nchw"]
                              + ["compile"] * compile_model)
        aug = DATASET.augment
        self.loader = DeviceLoader(data.train_x, data.train_y, batch, DATASET.mean, DATASET.std, device=device,
                                   train=True, crop_padding=aug.crop_padding, hflip=aug.hflip,
                                   rotation=aug.rotation, seed=seed, channels_last=channels_last)
        self.test_loader = DeviceLoader(data.test_x, data.test_y, EVAL_BATCH, DATASET.mean, DATASET.std,
                                        device=device, channels_last=channels_last)
        self.optimizer = build_optimizer(OPTIM, self.model.parameters())
        # one cosine over all the steps this loop will take (with no warm-up, 1 x total = epochs x per-epoch)
        self.scheduler = build_scheduler(OPTIM, self.optimizer, 1, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)  # as tract-train
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.epoch = 0

    def batches(self):
        """Training batches without end, one fresh epoch (order and augmentation) after another."""
        while True:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            yield from self.loader

    def train(self, batches) -> float:
        torch.backends.cudnn.benchmark = True  # as tract-train sets it
        return train_epoch(self.forward, batches, self.optimizer, self.scheduler, self.scaler,
                           torch.nn.CrossEntropyLoss(), self.amp_dtype, self.device, False)[0]

    def test_top1(self) -> float:
        return evaluate(self.forward, self.test_loader, self.amp_dtype, self.device)[1]


def load_data(root, synthetic_sizes=(CIFAR_TRAIN, CIFAR_TEST)) -> tuple[ImageData, bool]:
    """CIFAR-10 from `root` (never downloaded: a benchmark should not fetch 170 MB), else synthetic uint8 data."""
    try:
        return load_cifar("cifar10", root, download=False), True
    except UserError:
        print(f"note: no CIFAR-10 under {root} (pass --data or set TRACT_DATA); using synthetic uint8 data of its "
              "shape: the same work per step, so throughput is comparable, but accuracy means nothing", flush=True)
    g = torch.Generator().manual_seed(SEED)
    n_train, n_test = synthetic_sizes
    return ImageData(torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n_train,), generator=g),
                     torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n_test,), generator=g), [str(c) for c in range(10)], "synthetic"), False


def build_loops(args, models, data, device, total_steps, seed=SEED, kinds=LOOPS) -> dict:
    """One loop per (model, method, loop in `kinds`), each with its own copy of the model's one initialisation."""
    train_set = CifarImages(data.train_x, data.train_y, TRAIN_TRANSFORM)
    test_set = CifarImages(data.test_x, data.test_y, TEST_TRANSFORM)
    loops = {}
    for name in models:
        torch.manual_seed(seed)
        init = MODELS[name]()  # the same in every process: seeded construction on the CPU
        for method, lam in METHODS.items():
            for loop in kinds:
                model = copy.deepcopy(init)
                if lam is not None:
                    apply_tract(model, lam)
                if loop == "fast":  # TrAct in the baseline's layout: the overhead is TrAct's own
                    twin = loops.get((name, "baseline", loop))
                    loops[name, method, loop] = FastLoop(model, data, args.batch_size, device, total_steps,
                                                         args.precision, args.compile, seed,
                                                         twin.nchw_from if twin else "auto")
                else:
                    loops[name, method, loop] = ReferenceLoop(model, train_set, test_set, args.batch_size, device,
                                                              total_steps, seed)
    return loops


class ReferenceProcess:
    """The reference loops, built and trained in a process of their own, as the official script runs in its own.

    Spawned fresh, it has the C allocator's defaults whatever this process set (tract-train's CPU setting,
    tract_bench.allocator, is for the fast loop only), and its DataLoader workers fork from a lean process. Its
    loops get the same initialisations as build_loops gives here. A context manager: leaving it ends the process.
    """

    def __init__(self, args, models, data, device, total_steps, seed):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        arrays = [t.numpy() for t in (data.train_x, data.train_y, data.test_x, data.test_y)]  # pickled by value
        self.process = ctx.Process(target=serve_reference, args=(child, args, models, arrays, str(device),
                                                                 total_steps, seed), name="reference-loops")
        self.process.start()
        child.close()

    def handles(self, models) -> dict:
        return {(name, method, "reference"): Remote(self, (name, method, "reference"))
                for name in models for method in METHODS}

    def call(self, function, key, args):
        self.conn.send((function.__name__, key, args))
        ok, result = self.conn.recv()
        if not ok:
            raise RuntimeError(f"reference process, {function.__name__}{key}: {result}")
        return result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.conn.send(None)  # the process ends when asked, or on the pipe closing if this one failed
        self.conn.close()
        self.process.join(timeout=None if exc[0] is None else 10)
        if self.process.is_alive():
            self.process.terminate()


class Remote:
    """A reference loop living in a ReferenceProcess."""

    def __init__(self, process: ReferenceProcess, key):
        self.process, self.key = process, key


def run(loop, function, *args):
    """function(loop, *args) where the loop lives: in this process, or in the reference process."""
    return loop.process.call(function, loop.key, args) if isinstance(loop, Remote) else function(loop, *args)


@contextlib.contextmanager
def all_loops(args, models, data, device, total_steps, seed=SEED):
    """Every (model, method, loop): the fast loops here, handles to the reference loops in their own process."""
    with ReferenceProcess(args, models, data, device, total_steps, seed) as reference:
        yield {**build_loops(args, models, data, device, total_steps, seed, kinds=("fast",)),
               **reference.handles(models)}


def serve_reference(conn, args, models, arrays, device, total_steps, seed):
    """The reference process: builds its loops, then runs what ReferenceProcess.call sends until told to stop."""
    # spawn made itself this process's start method; the DataLoader workers start the platform's default way (fork
    # on Linux: spawned workers would each take seconds to start), as the official script's do
    multiprocessing.set_start_method(None, force=True)
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in arrays)
    data = ImageData(train_x, train_y, test_x, test_y, [], "")
    loops = build_loops(args, models, data, torch.device(device), total_steps, seed, kinds=("reference",))
    tasks = {f.__name__: f for f in (measure, train_epochs, evaluate_top1)}
    with contextlib.suppress(EOFError):  # the parent died: so does this
        while (command := conn.recv()) is not None:
            name, key, call_args = command
            try:
                conn.send((True, tasks[name](loops[key], *call_args)))
            except Exception as e:
                conn.send((False, f"{type(e).__name__}: {e}"))


def train_epochs(loop, epochs) -> float:
    """Train `epochs` whole epochs; the last epoch's mean loss."""
    for _ in range(epochs):
        epoch = loop.batches()
        loss = loop.train(islice(epoch, len(loop.loader)))
        epoch.close()
    return loss


def evaluate_top1(loop) -> float:
    return loop.test_top1()


def measure(loop, batch, warmup, steps, epochs, device) -> float:
    """Images/s over `steps` steps, or over `epochs` whole epochs, after `warmup` untimed steps."""
    batches = loop.batches()
    if warmup:
        loop.train(islice(batches, warmup))
    steps_per_epoch = len(loop.loader)
    if epochs:
        batches.close()  # each timed epoch is a fresh pass, start-up included, as in a real run
    sync(device)
    t0 = time.perf_counter()
    if epochs:
        for _ in range(epochs):
            epoch = loop.batches()
            loop.train(islice(epoch, steps_per_epoch))
            epoch.close()
    else:
        loop.train(islice(batches, steps))
    sync(device)
    seconds = time.perf_counter() - t0
    batches.close()
    return (epochs * steps_per_epoch if epochs else steps) * batch / seconds


def accuracy(args, data, device) -> list[dict]:
    """Train every (model, method, loop) for args.accuracy_epochs real epochs per seed; final test top-1 of each."""
    total = args.accuracy_epochs * (len(data.train_x) // args.batch_size)
    rows = []
    for seed in range(args.accuracy_seeds):
        with all_loops(args, args.accuracy_models, data, device, total, seed) as loops:
            for (name, method, loop_name) in product(args.accuracy_models, METHODS, LOOPS):
                loop, t0 = loops[name, method, loop_name], time.perf_counter()
                loss = run(loop, train_epochs, args.accuracy_epochs)
                rows.append({"model": name, "method": method, "loop": loop_name, "seed": seed,
                             "epochs": args.accuracy_epochs, "train_images": len(data.train_x),
                             "final_train_loss": round(loss, 4), "test_top1": round(run(loop, evaluate_top1), 2),
                             "train_s": round(time.perf_counter() - t0, 1)})
                print(f"accuracy  seed {seed}  {name:15s} {method:8s} {loop_name:9s} "
                      f"top-1 {rows[-1]['test_top1']:.2f} %", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="timed steps per repetition (default: 200 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timing (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--reps", type=int, help="repetitions; medians over them (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--epochs", type=int, default=0, help="time this many whole epochs per repetition, not --steps")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-size", type=int, default=BATCH, help="the paper's 128; smaller only for quick checks")
    p.add_argument("--data", default=os.environ.get("TRACT_DATA", "data"), help="folder holding CIFAR-10")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="the fast loop's precision, as tract-train's precision= (auto: bf16 on CUDA from Ampere "
                   "on, fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast loop's model, as compile=true")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train N epochs per loop; report test top-1")
    p.add_argument("--accuracy-models", nargs="+", choices=list(MODELS), help="models of the accuracy runs "
                   "(default: --models)")
    p.add_argument("--accuracy-seeds", type=int, help="repeat the accuracy runs for seeds 0..S-1 (default 1)")
    p.add_argument("--accuracy-train-subset", type=int, help="accuracy runs on a class-balanced subset this size")
    p.add_argument("--out-dir", default="results", help="where bench.csv and bench.md go")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = [flag for flag, value in [("--accuracy-seeds", args.accuracy_seeds), ("--accuracy-models",
             args.accuracy_models), ("--accuracy-train-subset", args.accuracy_train_subset)] if value is not None]
    if given and not args.accuracy_epochs:
        p.error(f"{given[0]} applies to the accuracy runs: add --accuracy-epochs N")
    args.accuracy_models = args.accuracy_models or args.models
    args.accuracy_seeds = 1 if args.accuracy_seeds is None else args.accuracy_seeds
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.steps, args.reps, args.batch_size, args.accuracy_seeds) < 1 \
            or min(args.warmup, args.epochs, args.accuracy_epochs) < 0:
        p.error("--steps, --reps, --batch-size and --accuracy-seeds must be >= 1; --warmup, --epochs and "
                "--accuracy-epochs >= 0")

    # this process runs the fast loop as tract-train runs: on a CPU, glibc reuses freed memory (the reference
    # loops run in their own process, with the allocator's defaults, as the official script does)
    reuse = device.type == "cpu" and keep_freed_memory()
    data, real = load_data(args.data)
    if args.accuracy_epochs and not real:
        p.error("--accuracy-epochs needs the real CIFAR-10: pass --data or set TRACT_DATA")
    if len(data.train_x) < args.batch_size:
        p.error(f"--batch-size {args.batch_size} exceeds the {len(data.train_x)} training images")
    acc_data = data
    if args.accuracy_train_subset is not None:  # checked now, not after the throughput runs
        acc_data = copy.copy(data)
        try:
            acc_data.train_x, acc_data.train_y = balanced_subset(data.train_x, data.train_y,
                                                                 args.accuracy_train_subset, data.num_classes)
        except UserError as e:
            p.error(f"--accuracy-train-subset {args.accuracy_train_subset}: {e}")
        if args.accuracy_train_subset < args.batch_size:
            p.error(f"--accuracy-train-subset {args.accuracy_train_subset} is smaller than --batch-size "
                    f"{args.batch_size}")
    data_label = f"CIFAR-10 ({len(data.train_x)} train images)" if real else "synthetic uint8, CIFAR-10 shape"
    per_rep = args.warmup + (args.epochs * (len(data.train_x) // args.batch_size) if args.epochs else args.steps)
    timed = f"{args.epochs} epoch(s)" if args.epochs else f"{args.steps} steps"
    timing = f"{timed} after {args.warmup} warm-up steps, x{args.reps} reps"
    print(f"{device_name(device)}; {data_label}; {timing}", flush=True)
    ips = {key: [] for key in product(args.models, METHODS, LOOPS)}
    with all_loops(args, args.models, data, device, args.reps * per_rep) as loops:
        for rep in range(args.reps):
            for name in args.models:
                for method in METHODS:
                    for loop in LOOPS if rep % 2 == 0 else LOOPS[::-1]:
                        rate = run(loops[name, method, loop], measure, args.batch_size, args.warmup, args.steps,
                                   args.epochs, device)
                        ips[name, method, loop].append(rate)
                        print(f"rep {rep + 1}/{args.reps}  {name:15s} {method:8s} {loop:9s} {rate:9.1f} images/s",
                              flush=True)
        labels = {key[:2]: loop.label for key, loop in loops.items() if key[2] == "fast"}
    del loops  # frees their memory before the accuracy runs

    rows = summarise(ips, labels, args, device, data_label, timing)
    checks = check_targets(rows, device)
    header = header_lines(device, data_label, args.batch_size, timing, reuse)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "bench.csv", rows)
    report = markdown(rows, checks, [], header)
    (out / "bench.md").write_text(report)  # written now, so a failed accuracy run loses no throughput result
    if args.accuracy_epochs:
        acc_rows = accuracy(args, acc_data, device)
        write_csv(out / "bench_accuracy.csv", acc_rows)
        report = markdown(rows, checks, acc_rows, header)
        (out / "bench.md").write_text(report)
    print("\n" + report, flush=True)
    return rows, checks


if __name__ == "__main__":
    main()
