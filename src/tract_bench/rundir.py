"""The run folder: where a config's run lives, and its files written so a crash never leaves a lie.

<out_dir>/<dataset>-<model>-<optim>/e<epochs>-<base|tractLAM>-s<seed>-<hash>/
    config.yaml             resolved config (written when the run starts)
    metrics.csv             one row per finished epoch
    log.txt                 the per-epoch log lines
    checkpoints/last.pt     full training state after the last finished epoch (atomic)
    summary.json            final metrics and provenance; its presence marks the run complete
"""

import csv
import hashlib
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

METRICS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
           "epoch_seconds", "images_per_second"]
# Keys that say where things are, how they are shown, or how fast/lean the same computation runs, not what is
# trained: a run keeps its folder when they change (so a compiled run can be resumed without compile).
NOT_HASHED = ("out_dir", "progress", "data.root", "data.download", "data.workers", "data.eval_batch_size",
              "compile", "channels_last", "tract.chunk_mb")


def run_path(cfg) -> Path:
    """The run folder of a config: readable, and unique through a hash of everything that shapes the result."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    for key in NOT_HASHED:
        *parents, leaf = key.split(".")
        node = resolved
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    digest = hashlib.sha1(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
    lam = cfg.tract.lam
    method = "base" if lam is None else f"tract{lam:g}"
    group = f"{cfg.dataset.name}-{cfg.model.name}-{cfg.optim.name}".replace("/", "_")
    return Path(cfg.out_dir) / group / f"e{cfg.epochs}-{method}-s{cfg.seed}-{digest}"


def atomic_write(path: Path, write):
    """Write through a temporary file and rename, so readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_config(folder: Path, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(folder: Path, rows: list[dict]):
    """Rewrite metrics.csv whole (a few hundred rows at most): on resume it drops epochs after the checkpoint."""
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRICS)
            w.writeheader()
            w.writerows(rows)
    atomic_write(folder / "metrics.csv", write)


def save_checkpoint(folder: Path, state: dict):
    (folder / "checkpoints").mkdir(exist_ok=True)
    atomic_write(folder / "checkpoints" / "last.pt", lambda p: torch.save(state, p))


def load_checkpoint(folder: Path):
    path = folder / "checkpoints" / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def write_summary(folder: Path, summary: dict):
    atomic_write(folder / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n"))
