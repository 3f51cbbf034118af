"""tract-report: turn run folders into tables, speed-ups and plots.

Run folders are read by tract_bench.rundir.find_runs. Only finished runs (summary.json) are averaged; the
rest are listed as incomplete. Everything written is sorted and formatted with fixed precision, with no
timestamps, so a results folder diffs cleanly in git.
"""

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tract_bench.errors import UserError
from tract_bench.paper_values import paper_accuracy
from tract_bench.plots import write_plots
from tract_bench.rundir import METRICS, NOT_HASHED, find_runs

log = logging.getLogger("tract_bench.report")  # warnings from reading run folders come from tract_bench.rundir

SETTING = ["dataset", "model", "optimizer"]
GROUP = SETTING + ["epochs", "method", "lam"]
# Keys that may differ between the seeds of one group without changing what is measured (where files are,
# which device, speed-only switches); any other difference means a group mixes settings.
NOT_SETTINGS = {"seed", *NOT_HASHED, "device", "compile", "channels_last", "deterministic", "tract.chunk_mb"}
# Columns written with 2 decimals; lam is written with %g.
FIXED_2 = {"top1_mean", "top1_std", "top5_mean", "top5_std", "paper_top1", "paper_top5", "target", "last_test_top1"}
BELOW = "below smallest baseline budget"
BEYOND = "beyond largest baseline budget"


def group_of(config: dict) -> dict:
    dataset = config["dataset.name"]
    classes = config.get("dataset.classes")
    if "subset" in dataset and classes is not None:  # an ImageNet subset is a different task per class set
        dataset = f"{dataset}[{classes}]"
    lam = config["tract.lam"]
    return {"dataset": dataset, "model": config["model.name"], "optimizer": config["optim.name"],
            "epochs": config["epochs"], "method": "baseline" if lam is None else "tract",
            "lam": math.nan if lam is None else float(lam)}


# ------------------------------------------------------------------------------------------- analysis

def final_table(complete: list[dict]) -> pd.DataFrame:
    """Mean ± sample std (ddof=1) of final test top-1/top-5 per group of complete runs."""
    columns = GROUP + ["n", "seeds", "top1_mean", "top1_std", "top5_mean", "top5_std", "paper_top1", "paper_top5"]
    if not complete:
        return pd.DataFrame(columns=columns)
    rows = [{**group_of(run["config"]), "seed": run["config"]["seed"], "top1": run["final"][0],
             "top5": run["final"][1], "config": run["config"]} for run in complete]
    table = []
    for key, members in pd.DataFrame(rows).groupby(GROUP, dropna=False, sort=False):
        configs = list(members["config"])
        _warn_mixed(dict(zip(GROUP, key)), configs)
        paper = paper_accuracy(configs[0]["dataset.name"], configs[0].get("dataset.classes"),
                               configs[0]["model.name"], configs[0]["epochs"], configs[0]["tract.lam"])
        table.append({**dict(zip(GROUP, key)), "n": len(members),
                      "seeds": ",".join(str(s) for s in sorted(members["seed"])),
                      "top1_mean": members["top1"].mean(), "top1_std": members["top1"].std(ddof=1),
                      "top5_mean": members["top5"].mean(), "top5_std": members["top5"].std(ddof=1),
                      "paper_top1": paper[0] if paper else math.nan,
                      "paper_top5": paper[1] if paper else math.nan})
    # The baseline (lam NaN) comes first within each budget.
    return pd.DataFrame(table, columns=columns).sort_values(GROUP, na_position="first").reset_index(drop=True)


def _warn_mixed(group: dict, configs: list[dict]) -> None:
    keys = sorted(set().union(*configs) - NOT_SETTINGS)
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    if differing:
        log.warning("group %s mixes runs that differ in %s; they are averaged as if they were seeds",
                    _label(group), ", ".join(differing))


def match_budget(budgets: list[int], accuracies: list[float], target: float) -> tuple[str, float]:
    """The smallest baseline budget whose accuracy reaches target, as (bound, epochs).

    Accuracy is interpolated linearly in log(epochs) between budgets. bound is "" for a match, "<" when even
    the smallest budget beats target (the match lies below it), ">" when no budget reaches it.
    """
    if target < accuracies[0]:
        return "<", float(budgets[0])
    for i, (epochs, accuracy) in enumerate(zip(budgets, accuracies)):
        if accuracy >= target:
            if i == 0:
                return "", float(epochs)
            lo_epochs, lo_accuracy = budgets[i - 1], accuracies[i - 1]
            t = (target - lo_accuracy) / (accuracy - lo_accuracy)
            return "", math.exp(math.log(lo_epochs) + t * (math.log(epochs) - math.log(lo_epochs)))
    return ">", float(budgets[-1])


def speedup_table(final: pd.DataFrame) -> pd.DataFrame:
    """For each TrAct group, the baseline budget with the same mean final top-1 and the ratio to its own."""
    rows = []
    for setting, rows_of_setting in final.groupby(SETTING, sort=True):
        base = rows_of_setting[rows_of_setting["method"] == "baseline"].sort_values("epochs")
        if base.empty:
            continue
        budgets, accuracies = list(base["epochs"]), list(base["top1_mean"])
        for _, row in rows_of_setting[rows_of_setting["method"] == "tract"].iterrows():
            bound, epochs = match_budget(budgets, accuracies, row["top1_mean"])
            rows.append({**dict(zip(SETTING, setting)), "epochs": row["epochs"], "lam": row["lam"],
                         "top1_mean": row["top1_mean"], "baseline_budgets": ",".join(map(str, budgets)),
                         "baseline_epochs": f"{bound}{epochs:.1f}", "ratio": f"{bound}{epochs / row['epochs']:.2f}",
                         "match": {"": "interpolated", "<": BELOW, ">": BEYOND}[bound]})
    columns = SETTING + ["epochs", "lam", "top1_mean", "baseline_budgets", "baseline_epochs", "ratio", "match"]
    return pd.DataFrame(rows, columns=columns)


def mean_curves(complete: list[dict]) -> pd.DataFrame:
    """Per group and epoch, test top-1 averaged over the group's complete runs."""
    if not complete:
        return pd.DataFrame(columns=GROUP + ["epoch", "test_top1"])
    frames = [run["metrics"][["epoch", "test_top1"]].assign(**group_of(run["config"])) for run in complete]
    curves = pd.concat(frames).groupby(GROUP + ["epoch"], dropna=False)["test_top1"].mean().reset_index()
    return curves.sort_values(GROUP + ["epoch"], na_position="first").reset_index(drop=True)


def epochs_to_target(complete: list[dict], final: pd.DataFrame, targets) -> pd.DataFrame:
    """Per group and target X, the first epoch each seed's test top-1 reaches X (mean over seeds that did)."""
    goals = {}  # setting -> {target: where it came from}
    for setting, rows in final.groupby(SETTING, sort=True):
        base = rows[rows["method"] == "baseline"].sort_values("epochs")
        goals[setting] = {}
        if not base.empty:
            last = base.iloc[-1]
            goals[setting][last["top1_mean"]] = f"baseline final @{last['epochs']} ep"
        for x in targets:
            goals[setting].setdefault(x, "--target")
    firsts = {}  # group -> first epoch reaching each target, one entry per complete run
    for run in complete:
        group = group_of(run["config"])
        for x in goals[tuple(group[k] for k in SETTING)]:
            hits = run["metrics"].loc[run["metrics"]["test_top1"] >= x, "epoch"]
            key = tuple(group[k] for k in GROUP) + (x,)
            firsts.setdefault(key, []).append(int(hits.min()) if len(hits) else None)
    rows = []
    for key, epochs in firsts.items():
        reached = [e for e in epochs if e is not None]
        rows.append({**dict(zip(GROUP, key)), "target": key[-1], "source": goals[key[:3]][key[-1]],
                     "reached": f"{len(reached)}/{len(epochs)}",
                     "epoch_mean": f"{np.mean(reached):.1f}" if reached else "never"})
    columns = GROUP + ["target", "source", "reached", "epoch_mean"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(GROUP + ["target"], na_position="first").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- writing

def _num(x, digits: int = 2, blank: str = "") -> str:
    return blank if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _lam(lam: float) -> str:
    return "" if math.isnan(lam) else f"{lam:g}"


def _label(group: dict) -> str:
    lam = "" if group["method"] == "baseline" else f" λ={_lam(group['lam'])}"
    return f"{group['dataset']}/{group['model']}/{group['optimizer']} {group['epochs']} ep {group['method']}{lam}"


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers as fixed-precision strings, so the same runs always give the same bytes."""
    columns = {c: frame[c].map(_num) for c in frame.columns if c in FIXED_2}
    if "lam" in frame.columns:
        columns["lam"] = frame["lam"].map(_lam)
    return frame.assign(**columns)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    _formatted(frame).to_csv(path, index=False, lineterminator="\n")


def _markdown(frame: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """Long format: one row per run per epoch, with the run's flattened config beside its metrics.

    data.root is left out: it says where one machine keeps the data, and results are shared across machines.
    """
    keys = sorted(set().union(*(run["config"] for run in runs)) - {"data.root"})
    frames = []
    for run in runs:
        # Lists (e.g. normalisation stats) become JSON so a cell stays one value.
        config = {k: json.dumps(v) if isinstance(v, list) else v for k, v in run["config"].items()}
        meta = {"path": run["path"], "status": "incomplete" if run["final"] is None else "complete"}
        frames.append(run["metrics"][METRICS].assign(**meta, **{k: config.get(k) for k in keys}))
    return pd.concat(frames)[["path", "status"] + keys + METRICS]


def incomplete_frame(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        if run["final"] is None:
            metrics, group = run["metrics"], group_of(run["config"])
            rows.append({"path": run["path"], **group, "seed": run["config"]["seed"],
                         "epochs_done": int(metrics["epoch"].max()) if len(metrics) else 0,
                         "last_test_top1": metrics["test_top1"].iloc[-1] if len(metrics) else math.nan})
    return pd.DataFrame(rows, columns=["path"] + GROUP + ["seed", "epochs_done", "last_test_top1"])


def _final_md(final: pd.DataFrame, speedup: pd.DataFrame, to_target: pd.DataFrame,
              incomplete: pd.DataFrame) -> str:
    ratios = {(*r[SETTING], r["epochs"], r["lam"]): f"{r['ratio']}× ({r['baseline_epochs']} ep"
              + ("" if r["match"] == "interpolated" else f", {r['match']}") + ")" for _, r in speedup.iterrows()}
    def mean_std(k: str) -> list[str]:
        return [f"{_num(m)} ± {_num(s, blank='–')}" for m, s in zip(final[f"{k}_mean"], final[f"{k}_std"])]

    table = pd.DataFrame({
        "Dataset": final["dataset"], "Model": final["model"], "Optimizer": final["optimizer"],
        "Epochs": final["epochs"], "Method": final["method"], "λ": final["lam"].map(_lam), "n": final["n"],
        "Top-1": mean_std("top1"), "Paper top-1": final["paper_top1"].map(_num),
        "Top-5": mean_std("top5"), "Paper top-5": final["paper_top5"].map(_num),
        "Speed-up": [ratios.get((*r[SETTING], r["epochs"], r["lam"]), "") for _, r in final.iterrows()],
    })
    has_paper = final["paper_top1"].notna().any()
    if not has_paper:
        table = table.drop(columns=["Paper top-1", "Paper top-5"])
    lines = ["# Results", "",
             "Final test accuracy (%) of complete runs: mean ± sample std (n − 1) over seeds.",
             "Speed-up: the baseline budget whose mean final top-1 equals TrAct's (interpolated in log epochs), "
             "divided by TrAct's budget; `>`/`<` mark bounds where TrAct lies outside the baseline's range.", ""]
    lines += _markdown(table)
    if has_paper:
        lines += ["", "Paper: Petersen et al., NeurIPS 2024, Table 1 (CIFAR-100, 200 epochs, SGD multi-step "
                  "protocol, 5 seeds) and Table 2 (ImageNet-1k ResNet-50); TrAct at λ = 0.1."]
    if len(to_target):
        lines += ["", "## Epochs to reach a test top-1 target", ""]
        lines += _markdown(_formatted(to_target))
    if len(incomplete):
        lines += ["", "## Incomplete runs (not averaged)", ""]
        lines += _markdown(_formatted(incomplete))
    return "\n".join(lines) + "\n"


def report(run_dirs: list[str], out: str | os.PathLike | None = None, targets=()) -> dict[str, Path]:
    """Read every run below run_dirs and write the report to out; returns {file name: path written}.

    out defaults to results/<name of the first run dir>; targets are extra test top-1 levels (%) for the
    epochs-to-target table, beside each setting's default (the baseline's final top-1 at its largest budget).
    """
    for x in targets:
        if not 0 < x <= 100:
            raise UserError(f"--target {x:g} is not a test top-1 percentage; pass a value in (0, 100]")
    if not run_dirs:
        raise UserError("no run directory given; pass the directory tract-train wrote its runs to")
    out = Path(out) if out is not None else Path("results") / Path(os.path.abspath(run_dirs[0])).name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the report")
    runs = find_runs(run_dirs)
    for run in runs:
        if run["final"] is None:
            log.warning("incomplete run (no summary.json), not averaged: %s", run["path"])
    complete = [run for run in runs if run["final"] is not None]
    final = final_table(complete)
    speedup = speedup_table(final)
    to_target = epochs_to_target(complete, final, targets)
    incomplete = incomplete_frame(runs)

    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in
               ["runs.csv", "final.csv", "final.md", "speedup.csv", "epochs_to_target.csv", "incomplete.csv"]}
    runs_frame(runs).to_csv(written["runs.csv"], index=False, lineterminator="\n")  # as the runs logged it
    for name, frame in [("final.csv", final), ("speedup.csv", speedup), ("epochs_to_target.csv", to_target),
                        ("incomplete.csv", incomplete)]:
        _write_csv(frame, written[name])
    written["final.md"].write_text(_final_md(final, speedup, to_target, incomplete))
    for path in write_plots(final, mean_curves(complete), out / "plots"):
        written[path.relative_to(out).as_posix()] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tract-report", description="Aggregate tract-train run folders into tables, speed-ups and plots.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders holding run folders, any depth")
    parser.add_argument("--out", help="output directory (default: results/<name of the first RUN_DIR>)")
    parser.add_argument("--target", type=float, nargs="+", action="extend", default=[], metavar="X",
                        help="also report the epochs each group needs to reach X %% test top-1")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tract-report: warning: %(message)s"))
    package_log = logging.getLogger("tract_bench")  # this module's and rundir's warnings
    package_log.addHandler(handler)
    try:
        written = report(args.run_dirs, args.out, args.target)
    except UserError as err:
        print(f"tract-report: error: {err}", file=sys.stderr)
        return 2
    finally:
        package_log.removeHandler(handler)
    out = written["final.md"].parent
    print(f"tract-report: wrote {len(written)} files to {out}/")
    # The summary is final.md's first section: the results table.
    print(written["final.md"].read_text().split("\n## ")[0], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
