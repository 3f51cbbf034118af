"""Optimizer and per-iteration learning-rate schedule from an `optim/` preset."""

import math

import torch

from tract_bench.errors import UserError


def build_optimizer(cfg_optim, params) -> torch.optim.Optimizer:
    kind = cfg_optim.optimizer
    if kind == "sgd":
        return torch.optim.SGD(params, lr=cfg_optim.lr, momentum=cfg_optim.momentum, nesterov=cfg_optim.nesterov,
                               weight_decay=cfg_optim.weight_decay)
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas), weight_decay=cfg_optim.weight_decay)
    raise UserError(f"unknown optim.optimizer {kind!r}; use sgd, adam or adamw")


def lr_factor(cfg_optim, step: int, epochs: int, steps_per_epoch: int) -> float:
    """The learning rate at iteration `step` as a fraction of optim.lr.

    A linear warm-up over `warmup_epochs`, then `cosine` (annealed to min_lr over the remaining iterations, as
    CosineAnnealingLR stepped every iteration) or `multistep` (x gamma at each milestone, given as fractions of
    the epoch budget so one preset serves every budget).
    """
    total, warmup = epochs * steps_per_epoch, round(cfg_optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg_optim.schedule == "cosine":
        floor = cfg_optim.min_lr / cfg_optim.lr
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg_optim.schedule == "multistep":
        epoch = step // steps_per_epoch
        return cfg_optim.gamma ** sum(epoch >= round(m * epochs) for m in cfg_optim.milestones)
    if cfg_optim.schedule == "constant":
        return 1.0
    raise UserError(f"unknown optim.schedule {cfg_optim.schedule!r}; use cosine, multistep or constant")


def build_scheduler(cfg_optim, optimizer, epochs: int, steps_per_epoch: int):
    """A LambdaLR stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg_optim, s, epochs, steps_per_epoch))
