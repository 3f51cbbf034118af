"""tract-report's figures: final top-1 vs epoch budget (the paper's Figure 3), top-1 vs epoch, λ sweeps.

Uses matplotlib's object API on the Agg canvas, never pyplot: no global figure state and no display needed.
"""

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SETTING = ["dataset", "model", "optimizer"]
LINE = ["method", "lam"]


def _axes(title: str, xlabel: str):
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel="test top-1 (%)")
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" stamp, so a PNG changes only when its picture does.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _file(out: Path, kind: str, *parts) -> Path:
    # Named like tract-train's run folders (dataset-model-optimizer), made safe for any file system.
    return out / (kind + "_" + "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts) + ".png")


def _name(method: str, lam: float) -> str:
    return "baseline" if method == "baseline" else f"TrAct λ={lam:g}"


def _style(method: str) -> dict:
    # The baseline in black, every λ in its own colour from the default cycle.
    return {"color": "black"} if method == "baseline" else {}


def _log_axis(ax, values, fmt=str) -> None:
    # Tick exactly the budgets (or λs) that were run; log-scale minor ticks would only add clutter.
    values = sorted(set(values))
    ax.set_xscale("log")
    ax.set_xticks(values, labels=[fmt(v) for v in values])
    ax.minorticks_off()


def budget_plots(final: pd.DataFrame, out: Path) -> list[Path]:
    """Per setting: mean final top-1 vs epoch budget, ±1 std band, one line per method and λ."""
    paths = []
    for setting, rows in final.groupby(SETTING, sort=True):
        fig, ax = _axes(" / ".join(setting), "epoch budget")
        for (method, lam), line in rows.groupby(LINE, dropna=False, sort=True):
            line = line.sort_values("epochs")
            mean, std = line["top1_mean"], line["top1_std"].fillna(0.0)  # n = 1: no band
            drawn = ax.plot(line["epochs"], mean, marker="o", label=_name(method, lam), **_style(method))
            ax.fill_between(line["epochs"], mean - std, mean + std, color=drawn[0].get_color(), alpha=0.15)
        _log_axis(ax, rows["epochs"])
        ax.legend(fontsize="small")
        paths.append(_save(fig, _file(out, "budget", *setting)))
    return paths


def curve_plots(curves: pd.DataFrame, out: Path) -> list[Path]:
    """Per setting and budget: test top-1 over epochs, mean over seeds, one line per method and λ."""
    paths = []
    for key, rows in curves.groupby(SETTING + ["epochs"], sort=True):
        fig, ax = _axes(f"{' / '.join(key[:3])}, {key[3]} epochs", "epoch")
        for (method, lam), line in rows.groupby(LINE, dropna=False, sort=True):
            ax.plot(line["epoch"], line["test_top1"], label=_name(method, lam), linewidth=1.2, **_style(method))
        ax.legend(fontsize="small")
        paths.append(_save(fig, _file(out, "curves", *key[:3], f"e{key[3]}")))
    return paths


def lambda_plots(final: pd.DataFrame, out: Path) -> list[Path]:
    """Per setting and budget where runs vary λ: final top-1 vs λ, the baseline as a horizontal line."""
    paths = []
    for key, rows in final.groupby(SETTING + ["epochs"], sort=True):
        tract = rows[rows["method"] == "tract"].sort_values("lam")
        if len(tract) < 2:
            continue
        fig, ax = _axes(f"{' / '.join(key[:3])}, {key[3]} epochs", "λ")
        ax.errorbar(tract["lam"], tract["top1_mean"], yerr=tract["top1_std"].fillna(0.0), marker="o",
                    capsize=3, label="TrAct")
        for _, base in rows[rows["method"] == "baseline"].iterrows():
            ax.axhline(base["top1_mean"], color="black", label="baseline")
            if not math.isnan(base["top1_std"]):
                ax.axhspan(base["top1_mean"] - base["top1_std"], base["top1_mean"] + base["top1_std"],
                           color="black", alpha=0.1)
        _log_axis(ax, tract["lam"], fmt=lambda lam: f"{lam:g}")
        ax.legend(fontsize="small")
        paths.append(_save(fig, _file(out, "lambda", *key[:3], f"e{key[3]}")))
    return paths


def write_plots(final: pd.DataFrame, curves: pd.DataFrame, out: Path) -> list[Path]:
    """Write every figure to out, removing figures an earlier report wrote for groups that are now gone."""
    paths = budget_plots(final, out) + curve_plots(curves, out) + lambda_plots(final, out)
    for stale in sorted(out.glob("*.png")) if out.is_dir() else []:
        if stale not in paths:
            stale.unlink()
    return paths
