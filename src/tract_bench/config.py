"""Where the configs live, the custom resolver they use, and the checks on values Hydra cannot type."""

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tract_bench.errors import UserError


def config_dir() -> str:
    """conf/ inside the installed package (pip install .), else the checkout's top-level conf/ (editable)."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parents[1] / "conf"):
        if (d / "train.yaml").is_file():
            return str(d)
    raise RuntimeError(f"tract-bench configs not found next to {here}; reinstall the package")


def by_epochs(epochs, thresholds, values):
    """`${by_epochs:${epochs},[0,400],[1e-2,1e-3]}`: the value of the last threshold <= epochs (a per-budget lr)."""
    return [v for t, v in zip(thresholds, values) if epochs >= t][-1]


def register_resolvers():
    if not OmegaConf.has_resolver("by_epochs"):
        OmegaConf.register_new_resolver("by_epochs", by_epochs)


def default_channels_last(device) -> bool:
    """Whether `channels_last: auto` lays the data and model out NHWC: on CUDA, where cuDNN's tensor-core
    convolutions run fastest on it, and on a CPU, where tract_bench.layout then times from which stage on NCHW is
    faster (oneDNN's best layout depends on the CPU and the feature-map size); off elsewhere."""
    return device.type in ("cuda", "cpu")


def channels_last(cfg, device) -> bool:
    return default_channels_last(device) if cfg.channels_last == "auto" else bool(cfg.channels_last)


def resolve_precision(precision: str, device) -> str:
    """What `precision: auto` means. On CUDA: bf16 autocast from Ampere (compute capability 8) on and on ROCm, fp16
    autocast with a GradScaler on older GPUs, which only emulate bf16. On CPU: fp32. bf16 autocast runs ResNet-18
    1.7x faster on a CPU with AVX512-BF16, but there it ended behind fp32 in most paired short runs
    (results/README.md), so on CPU it is opt-in (precision=bf16)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def validate(cfg):
    """Refuse bad values before anything is built or written; each message names the value and the fix."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf's errors carry the key; keep the first line
        raise UserError(f"bad config: {str(e).splitlines()[0]}") from None
    lam = cfg.tract.lam
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                            or not math.isfinite(lam) or lam <= 0):
        raise UserError(f"tract.lam={lam} is not a finite number > 0; use e.g. tract.lam=0.1, or tract.lam=null "
                        "for the baseline")
    for key in ("epochs", "batch_size", "data.eval_batch_size"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{key}={value} must be a positive integer")
    for key in ("data.train_subset", "data.test_subset"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UserError(f"{key}={value} must be a positive integer or null (the whole split)")
    if cfg.channels_last not in ("auto", True, False):
        raise UserError(f"channels_last={cfg.channels_last} is not one of auto, true, false")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"precision={cfg.precision} is not one of auto, fp32, bf16, fp16")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr={cfg.optim.lr} must be > 0")
