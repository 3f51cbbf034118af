"""One training run: config -> data, model, TrAct, optimizer -> epochs -> run folder.

The flow is deliberately flat: validate everything, build everything, then (only then) create the run folder,
resume from its checkpoint if there is one, and train. Every epoch ends with a full test-set evaluation, a
metrics row and an atomic checkpoint, so an interrupted run resumes where it stopped and a finished one is
skipped. The reported result is always the final epoch's, never a checkpoint picked on test accuracy.
"""

import contextlib
import math
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from tqdm import tqdm

from tract_bench import distributed, layout, rundir, smallmap
from tract_bench.allocator import keep_freed_memory
from tract_bench.config import channels_last, resolve_precision, validate
from tract_bench.data import balanced_subset, load_cifar
from tract_bench.errors import UserError
from tract_bench.loader import DeviceLoader
from tract_bench.models import build_model, check_fits
from tract_bench.optim import build_optimizer, build_scheduler
from tract_bench.tract import apply_tract


def resolve_device(name: str, index: int = 0) -> torch.device:
    """cpu, or a CUDA device with an index: `auto`/`cuda` take `index` (the local rank, or a sweep job's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
        device = torch.device("cuda", index if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device={name}: only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def sweep_gpu() -> int:
    """A multirun job's GPU: job number mod visible GPUs, since jobs run side by side under hydra/launcher=joblib
    (or submitit_local). 0 outside a multirun, and on SLURM, where a job only sees its own GPU."""
    if torch.cuda.device_count() == 0 or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 0
    return HydraConfig.get().job.num % torch.cuda.device_count()


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype
# fp16's GradScaler skips the first steps when its initial scale overflows; the schedule advances anyway, as it
# should, so torch's warning that the scheduler stepped before the optimizer is noise here.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (e.g. adaptive pooling) have no deterministic version
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def build_loaders(cfg, device, rank=0, world_size=1):
    """(train loader, test loader, meta) for the configured dataset; meta: num_classes, source, image counts."""
    if cfg.dataset.name == "imagenet_subset":
        from tract_bench.imagenet import build_imagenet_loaders  # decoding workers: only for ImageFolder data

        return build_imagenet_loaders(cfg, device, rank, world_size)
    data = load_cifar(cfg.dataset.name, cfg.data.root, download=cfg.data.download)
    n = data.num_classes
    if cfg.data.train_subset:
        data.train_x, data.train_y = balanced_subset(data.train_x, data.train_y, cfg.data.train_subset, n)
    if cfg.data.test_subset:
        data.test_x, data.test_y = balanced_subset(data.test_x, data.test_y, cfg.data.test_subset, n)
    common = dict(device=device, channels_last=channels_last(cfg, device), rank=rank, world_size=world_size)
    augment = cfg.dataset.augment
    train = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, cfg.dataset.mean, cfg.dataset.std, train=True,
                         crop_padding=augment.crop_padding, hflip=augment.hflip, rotation=augment.rotation,
                         seed=cfg.seed, **common)
    test = DeviceLoader(data.test_x, data.test_y, cfg.data.eval_batch_size, cfg.dataset.mean, cfg.dataset.std,
                        **common)
    meta = {"num_classes": n, "source": data.source, "train_images": len(data.train_x),
            "test_images": len(data.test_x)}
    return train, test, meta


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The tract-bench commit that ran, with '+dirty' when the checkout had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def evaluate(model, loader, amp_dtype, device):
    """Loss, top-1 and top-5 (percent) over the whole split, counting correct / total over all ranks."""
    model.eval()
    loss_sum, top1, top5, total = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(4))
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x, y in loader:
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            top1 += (top[:, 0] == y).sum()
            top5 += (top == y[:, None]).any(1).sum()
            total += len(y)
    loss_sum, top1, top5, total = (v.item() for v in distributed.sum_all(loss_sum, top1, top5, total))
    return loss_sum / total, 100 * top1 / total, 100 * top5 / total


def train_epoch(model, loader, optimizer, scheduler, scaler, criterion, amp_dtype, device, show_progress):
    """One epoch; returns (mean train loss, train accuracy %, images seen, steps skipped) over all ranks.

    With fp16's GradScaler on, a step whose gradients overflowed is skipped (the scaler lowers its scale and
    leaves the weights alone): loss and accuracy are means over the steps that were taken, and the skipped ones
    are counted. If every step was skipped the loss is NaN and the run counts as diverged.
    """
    model.train()
    loss_sum, taken, correct, seen, skipped = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(5))
    every_step = torch.ones((), dtype=torch.bool, device=device)  # without a scaler no step is skipped
    for x, y in tqdm(loader, leave=False, disable=not show_progress, unit="batch"):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # GradScaler lowers its scale exactly when it skips a step; reading its scale tensor (it has no public,
        # sync-free "skipped" flag) keeps everything below on the device: no host sync per step.
        scale = scaler._scale.clone() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        took = scaler._scale >= scale if scale is not None else every_step
        loss_sum += torch.where(took, loss.detach(), 0.0) * len(y)
        taken += took * len(y)
        correct += ((out.argmax(1) == y) & took).sum()
        seen += len(y)
        skipped += ~took
    loss_sum, taken, correct, seen, skipped = (
        v.item() for v in distributed.sum_all(loss_sum, taken, correct, seen, skipped))
    if not taken:
        return math.nan, math.nan, int(seen), int(skipped)
    return loss_sum / taken, 100 * correct / taken, int(seen), int(skipped)


def choose_layout(cfg, model, state, *, batch, num_classes, amp_dtype, main) -> str | None:
    """Under `channels_last: auto`, the child of the model from which on it runs NCHW rather than NHWC
    (tract_bench.layout; None: nowhere). Where `layout.timed_here` (a CPU, not deterministic, not fp16), rank 0
    times it once per run and every rank takes its choice; the checkpoint keeps it for a resumed run."""
    device = next(model.parameters()).device
    if cfg.channels_last != "auto" or not layout.timed_here(device, amp_dtype, cfg.deterministic):
        return None
    if state is not None:
        return state.get("nchw_from")  # None in checkpoints from before the layout was timed: NHWC, as then
    choice = None
    if main:
        t0, size = time.perf_counter(), cfg.dataset.image_size
        choice = layout.tune(model, (batch, 3, size, size), num_classes, amp_dtype)
        print(f"layout: {layout.describe(model, choice)}, the fastest of {len(layout.switch_points(model)) + 1} "
              f"timed on this CPU ({time.perf_counter() - t0:.1f} s; channels_last=true|false skips this)",
              flush=True)
    return distributed.from_rank0(choice)


def run(cfg) -> Path:
    """Train the configured run (or resume it, or skip it when finished); return its folder.

    Under torchrun every rank runs this; only rank 0 writes the run folder.
    """
    validate(cfg)
    folder = rundir.run_path(cfg)
    if (folder / "summary.json").exists():
        print(f"finished already, skipping: {folder}", flush=True)
        return folder
    rank, world_size, local_rank = distributed.init()
    main = rank == 0
    device = resolve_device(cfg.device, local_rank if world_size > 1 else sweep_gpu())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # default-device work (cudnn handles, compile, amp) stays on this job's GPU
    else:
        keep_freed_memory()  # CPU steps reuse their activation buffers instead of re-faulting them: ~10 % faster
    precision = resolve_precision(cfg.precision, device)
    amp_dtype = AUTOCAST[precision]
    seed_everything(cfg.seed, cfg.deterministic)

    # Build everything that can fail on bad input before the run folder exists.
    with distributed.rank0_first():  # one rank downloads or unpacks the data, the others then read it
        train_loader, test_loader, meta = build_loaders(cfg, device, rank, world_size)
    num_classes, size = meta["num_classes"], cfg.dataset.image_size
    model = build_model(cfg.model, num_classes, size)
    check_fits(model, num_classes, size)
    tract = None
    if cfg.tract.lam is not None:
        try:
            layer = apply_tract(model, cfg.tract.lam, cfg.tract.layer, chunk_bytes=int(cfg.tract.chunk_mb * 2**20),
                                input_size=(3, size, size), sync_gram=cfg.tract.sync_gram)
        except ValueError as e:
            raise UserError(str(e)) from None
        tract = {"layer": layer, "n": model.get_submodule(layer).weight[0].numel(), "lam": cfg.tract.lam}
    model.to(device, memory_format=torch.contiguous_format)
    state = rundir.load_checkpoint(folder)
    small_maps = False  # 3x3 convolutions on 2x2 maps as matrix products: the same values, faster on a CPU
    if cfg.channels_last == "auto" and smallmap.used_here(device, amp_dtype):
        # a run resumes as it started (checkpoints from before tract_bench.smallmap ran plain convolutions); before
        # the layout is timed, which then times it too
        if state is None or state.get("small_maps", False):
            small_maps = smallmap.convert(model, (3, size, size)) > 0
    nchw_from, layout_name = None, "nchw"
    if channels_last(cfg, device):
        nchw_from = choose_layout(cfg, model, state, batch=cfg.batch_size // world_size, num_classes=num_classes,
                                  amp_dtype=amp_dtype, main=main)
        layout_name = layout.describe(layout.apply(model, nchw_from), nchw_from)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    forward = model
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)

    start_epoch, wall, rows = 0, 0.0, []
    if state is not None:  # resume exactly: weights, optimizer, schedule, scaler, RNG; data order is f(seed, epoch)
        if state["precision"] != precision:  # e.g. precision=auto started on a CPU, resumed on a GPU
            raise UserError(f"{folder} was trained in {state['precision']} so far, this machine would continue in "
                            f"{precision}; resume with precision={state['precision']} or start anew with another "
                            "out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        start_epoch, wall = state["epoch"], state["wall_seconds"]
        rows = rundir.read_metrics(folder)[:start_epoch]
        if main:
            print(f"resuming {folder} after epoch {start_epoch}", flush=True)
    elif main:
        rundir.write_config(folder, cfg)

    show_progress = main and (sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress))
    logfile = open(folder / "log.txt", "a") if main else None
    if main:
        print(f"run folder: {folder}  ({device_name(device)} x{world_size}, {precision}, {layout_name}, "
              f"TrAct: {tract or 'off'})", flush=True)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, seen, skipped = train_epoch(forward, train_loader, optimizer, scheduler, scaler,
                                                           criterion, amp_dtype, device, show_progress)
        train_seconds = time.perf_counter() - t0
        test_loss, top1, top5 = evaluate(forward, test_loader, amp_dtype, device)
        seconds = time.perf_counter() - t0
        wall += seconds
        rows.append(dict(epoch=epoch, step=epoch * len(train_loader), lr=f"{lr:.6g}", train_loss=f"{train_loss:.6f}",
                         train_acc=f"{train_acc:.4f}", test_loss=f"{test_loss:.6f}", test_top1=f"{top1:.4f}",
                         test_top5=f"{top5:.4f}", epoch_seconds=f"{seconds:.3f}",
                         images_per_second=f"{seen / train_seconds:.1f}"))
        if main:
            rundir.write_metrics(folder, rows)
            rundir.save_checkpoint(folder, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "wall_seconds": wall, "precision": precision,
                "nchw_from": nchw_from, "small_maps": small_maps,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})
            line = (f"epoch {epoch}/{cfg.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} acc {train_acc:.2f}%  "
                    f"test loss {test_loss:.4f} top1 {top1:.2f}% top5 {top5:.2f}%  {seconds:.1f}s "
                    f"({seen / train_seconds:.0f} img/s)" + (f"  {skipped} fp16 steps skipped" if skipped else ""))
            print(line, flush=True)
            logfile.write(line + "\n")
            logfile.flush()
        if not math.isfinite(train_loss):
            break  # diverged: recorded as such, never averaged in as a result
    del forward  # DDP holds the process group: free it first, or gloo's teardown can hang (seen with torch 2.11)
    if not main:
        distributed.shutdown()
        return folder
    logfile.close()

    last = rows[-1]
    rundir.write_summary(folder, {
        "status": "complete" if math.isfinite(float(last["train_loss"])) else "diverged",
        "epochs_completed": int(last["epoch"]),
        "final": {k: float(last[k]) for k in ("test_top1", "test_top5", "test_loss", "train_loss", "train_acc")},
        "wall_seconds": round(wall, 3), "device": device_name(device), "world_size": world_size,
        "precision": precision, "layout": layout_name, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "git_commit": git_commit(), "tract": tract,
        "normalization": {"mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)}, "data": meta,
    })
    print(f"done: {folder}  final test top1 {float(last['test_top1']):.2f}%", flush=True)
    distributed.shutdown()
    return folder
