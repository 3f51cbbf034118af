"""The run folder: where a config's run lives, its files written so a crash never leaves a lie, and read back.

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
import logging
import os
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from tract_bench.errors import UserError

log = logging.getLogger("tract_bench.rundir")

METRICS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
           "epoch_seconds", "images_per_second"]
# Keys that say where things are, how they are shown, or how fast/lean the same computation runs, not what is
# trained: a run keeps its folder when they change (so a compiled run can be resumed without compile).
NOT_HASHED = ("out_dir", "progress", "data.root", "data.download", "data.workers", "data.eval_batch_size",
              "compile", "channels_last", "tract.chunk_mb")


# What tract-report needs of a config.yaml to place a run in a table.
REQUIRED = ["dataset.name", "model.name", "optim.name", "epochs", "seed", "tract.lam"]


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


# ------------------------------------------------------------------------------- reading (tract-report)

def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run(path: str) -> dict | None:
    """One run as {path, config, metrics, final}; None (with a warning) when the folder can't be used."""
    folder = Path(path)
    try:
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
        config = flatten_config(config)
    except Exception as err:  # YAML syntax, failed interpolation, not a mapping: all mean "unreadable"
        reason = str(err).partition("\n")[0] or type(err).__name__
        log.warning("skipping %s: unreadable config.yaml (%s)", path, reason)
        return None
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        log.warning("skipping %s: config.yaml lacks %s", path, ", ".join(missing))
        return None
    if not isinstance(config["epochs"], int) or not isinstance(config["tract.lam"], (int, float, type(None))):
        log.warning("skipping %s: config.yaml has epochs=%r, tract.lam=%r; expected an int and a number or null",
                    path, config["epochs"], config["tract.lam"])
        return None

    metrics = pd.DataFrame(columns=METRICS)  # a run that has not finished its first epoch yet
    if (folder / "metrics.csv").is_file():
        try:
            metrics = pd.read_csv(folder / "metrics.csv")
        except pd.errors.EmptyDataError:
            pass
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            log.warning("skipping %s: unreadable metrics.csv (%s)", path, err)
            return None
        if set(METRICS) - set(metrics.columns):
            log.warning("skipping %s: metrics.csv lacks columns %s", path,
                        ", ".join(sorted(set(METRICS) - set(metrics.columns))))
            return None

    final = None
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
            if summary["status"] == "complete":
                final = (float(summary["final"]["test_top1"]), float(summary["final"]["test_top5"]))
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable summary.json (%s); counting the run as incomplete", path, err)
    return {"path": path, "config": config, "metrics": metrics.sort_values("epoch"), "final": final}


def find_runs(run_dirs: list[str]) -> list[dict]:
    """Every run folder at any depth below run_dirs, sorted by path."""
    runs, seen = [], set()
    for root in run_dirs:
        if not os.path.isdir(root):
            raise UserError(f"run directory {root!r} does not exist; pass folders written by tract-train")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "config.yaml" in filenames:
                dirnames[:] = []  # folders inside a run (checkpoints/) are not runs
                real = os.path.realpath(dirpath)
                if real not in seen:  # overlapping RUN_DIRs must not count a run twice
                    seen.add(real)
                    runs.append(load_run(os.path.normpath(dirpath)))
            elif any(not name.startswith(".") for name in filenames):
                log.warning("skipping %s: no config.yaml, so not a run folder", os.path.normpath(dirpath))
    runs = sorted((run for run in runs if run is not None), key=lambda run: run["path"])
    if not runs:
        raise UserError(f"no run folders (config.yaml + metrics.csv) below {' '.join(run_dirs)}; "
                        "pass the directory tract-train wrote its runs to")
    return runs
