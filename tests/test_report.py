"""tract-report on run folders written here with known numbers."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from tract_bench.errors import UserError
from tract_bench.report import main, match_budget, report


def write_run(root, name, *, final_top1, epochs=4, lam=None, seed=0, dataset="cifar10", model="resnet18",
              optim="sgd_cosine", curve=None, complete=True, lr=0.08, classes=None):
    """A run folder as tract-train leaves it; the test top-1 curve defaults to a ramp ending at final_top1."""
    run = root / name
    run.mkdir(parents=True)
    config = {"dataset": {"name": dataset}, "model": {"name": model}, "optim": {"name": optim, "lr": lr},
              "epochs": epochs, "seed": seed, "batch_size": 128, "tract": {"lam": lam},
              "data": {"root": "/home/someone/datasets", "train_subset": None}}
    if classes is not None:
        config["dataset"]["classes"] = classes
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    curve = curve or [final_top1 - (epochs - e) * 0.5 for e in range(1, epochs + 1)]
    lines = ["epoch,step,lr,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds,images_per_second"]
    lines += [f"{e},{e * 390},0.08,1.0,80.0,0.9,{top1},{top1 + 5},10.0,5000.0" for e, top1 in enumerate(curve, 1)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if complete:
        summary = {"status": "complete", "epochs_completed": len(curve),
                   "final": {"test_top1": final_top1, "test_top5": final_top1 + 5, "test_loss": 0.9,
                             "train_loss": 1.0, "train_acc": 80.0}, "wall_seconds": 40.0, "device": "cpu",
                   "torch": "x", "timm": "x", "git_commit": "x", "tract": None,
                   "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row(rows, **match):
    hits = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert len(hits) == 1, (match, rows)
    return hits[0]


def test_aggregates_complete_runs_with_bessel_std(tmp_path, caplog):
    runs = tmp_path / "runs"
    for seed, top1 in enumerate([90.0, 91.0, 93.0]):
        write_run(runs / "cifar10-resnet18", f"base-s{seed}", final_top1=top1, seed=seed)
    write_run(runs / "cifar10-resnet18", "tract-s0", final_top1=92.5, lam=0.1)
    write_run(runs / "cifar10-resnet18", "tract-s1", final_top1=99.0, lam=0.1, seed=1, complete=False)
    (runs / "cifar10-resnet18" / "base-s0" / "checkpoints").mkdir()
    (runs / "cifar10-resnet18" / "base-s0" / "checkpoints" / "last.pt").write_bytes(b"x")
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("epochs: [unclosed\n")

    written = report([str(runs)], tmp_path / "out")

    final = read_csv(written["final.csv"])
    base = row(final, method="baseline")
    assert (base["n"], base["seeds"], base["top1_mean"]) == ("3", "0,1,2", "91.33")
    assert base["top1_std"] == f"{statistics.stdev([90.0, 91.0, 93.0]):.2f}" == "1.53"
    assert base["top5_mean"] == "96.33"
    tract = row(final, method="tract")
    assert (tract["n"], tract["lam"], tract["top1_mean"], tract["top1_std"]) == ("1", "0.1", "92.50", "")
    assert "| 92.50 ± – |" in written["final.md"].read_text()

    incomplete = read_csv(written["incomplete.csv"])
    assert [(r["path"].split("/")[-1], r["epochs_done"]) for r in incomplete] == [("tract-s1", "4")]
    assert "## Incomplete runs" in written["final.md"].read_text()
    warnings = caplog.text
    assert "incomplete run" in warnings and "tract-s1" in warnings
    assert "notes: no config.yaml" in warnings
    assert "broken: unreadable config.yaml" in warnings
    assert "checkpoints" not in warnings

    long = read_csv(written["runs.csv"])
    assert len(long) == 5 * 4  # every run (incomplete too) x 4 epochs
    assert {"path", "status", "dataset.name", "optim.lr", "tract.lam", "data.train_subset", "test_top1"} <= set(long[0])
    assert "data.root" not in long[0]  # one machine's data location does not belong in shared results
    assert {r["status"] for r in long if r["path"].endswith("tract-s1")} == {"incomplete"}


def test_only_incomplete_runs_are_listed_not_averaged(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", "running", final_top1=50.0, complete=False, curve=[40.0, 50.0])
    (tmp_path / "runs" / "just-started").mkdir()
    (tmp_path / "runs" / "just-started" / "config.yaml").write_text(
        (tmp_path / "runs" / "running" / "config.yaml").read_text())

    monkeypatch.chdir(tmp_path)
    written = report(["runs/"])  # --out defaults to results/<name of the first RUN_DIR>

    assert written["final.csv"] == Path("results/runs/final.csv")
    assert read_csv(written["final.csv"]) == []
    incomplete = read_csv(written["incomplete.csv"])
    assert [(r["path"][-12:], r["epochs_done"], r["last_test_top1"]) for r in incomplete] == [
        ("just-started", "0", ""), ("runs/running", "2", "50.00")]


def test_warns_when_a_group_mixes_settings(tmp_path, caplog):
    write_run(tmp_path, "a", final_top1=90.0, lr=0.08)
    write_run(tmp_path, "b", final_top1=91.0, lr=0.1, seed=1)
    report([str(tmp_path)], tmp_path / "out")
    assert "differ in optim.lr" in caplog.text


@pytest.mark.parametrize("name", ["missing", "empty"])
def test_no_runs_is_a_user_error_and_exit_2(tmp_path, capsys, name):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=name):
        report([str(tmp_path / name)], tmp_path / "out")
    assert main([str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("tract-report: error: ")
    with pytest.raises(UserError):
        report([], tmp_path / "out")


def test_bad_target_exits_2(tmp_path, capsys):
    write_run(tmp_path / "runs", "a", final_top1=90.0)
    assert main([str(tmp_path / "runs"), "--target", "150"]) == 2
    assert "--target 150" in capsys.readouterr().err


def test_match_budget_interpolates_in_log_epochs():
    bound, epochs = match_budget([100, 200, 400], [90.0, 91.0, 92.0], 91.5)
    assert bound == "" and math.isclose(epochs, math.sqrt(200 * 400))
    assert match_budget([100, 200, 400], [90.0, 91.0, 92.0], 90.0) == ("", 100.0)
    assert match_budget([100, 200, 400], [90.0, 91.0, 92.0], 95.0) == (">", 400.0)
    assert match_budget([100, 200, 400], [90.0, 91.0, 92.0], 89.0) == ("<", 100.0)
    # A noisy, non-monotone baseline: the first budget that reaches the target counts.
    bound, epochs = match_budget([100, 200, 400], [90.0, 92.0, 91.0], 92.0)
    assert bound == "" and math.isclose(epochs, 200.0)


def test_speedup_matched_beyond_and_below(tmp_path):
    runs = tmp_path / "runs"
    for epochs, top1 in [(100, 90.0), (200, 91.0), (400, 92.0)]:
        write_run(runs, f"base-e{epochs}", final_top1=top1, epochs=epochs)
    write_run(runs, "tract-match", final_top1=91.5, epochs=100, lam=0.1)
    write_run(runs, "tract-beyond", final_top1=93.0, epochs=100, lam=0.05)
    write_run(runs, "tract-below", final_top1=89.0, epochs=200, lam=0.2)

    written = report([str(runs)], tmp_path / "out")

    speedup = read_csv(written["speedup.csv"])
    match = row(speedup, lam="0.1")
    assert (match["baseline_epochs"], match["ratio"], match["match"]) == ("282.8", "2.83", "interpolated")
    beyond = row(speedup, lam="0.05")
    assert (beyond["baseline_epochs"], beyond["ratio"], beyond["match"]) == (
        ">400.0", ">4.00", "beyond largest baseline budget")
    below = row(speedup, lam="0.2")
    assert (below["baseline_epochs"], below["ratio"], below["match"]) == (
        "<100.0", "<0.50", "below smallest baseline budget")
    md = written["final.md"].read_text()
    assert "2.83× (282.8 ep)" in md and ">4.00× (>400.0 ep, beyond largest baseline budget)" in md


def test_epochs_to_target(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "base", final_top1=80.0, epochs=6, curve=[50, 60, 70, 75, 78, 80])
    write_run(runs, "tract-s0", final_top1=85.0, epochs=6, lam=0.1, curve=[60, 70, 80, 82, 84, 85])
    write_run(runs, "tract-s1", final_top1=86.0, epochs=6, lam=0.1, seed=1, curve=[60, 75, 79, 79.5, 81, 86])

    written = report([str(runs)], tmp_path / "out", targets=[86.0])

    table = read_csv(written["epochs_to_target.csv"])
    # Default target: the baseline's mean final top-1 at its largest budget (80 %).
    assert row(table, method="tract", target="80.00")["epoch_mean"] == "4.0"  # epochs 3 and 5
    assert row(table, method="tract", target="80.00")["reached"] == "2/2"
    assert row(table, method="tract", target="80.00")["source"] == "baseline final @6 ep"
    assert row(table, method="baseline", target="80.00")["epoch_mean"] == "6.0"
    assert row(table, method="tract", target="86.00")["reached"] == "1/2"
    assert row(table, method="tract", target="86.00")["epoch_mean"] == "6.0"
    assert row(table, method="baseline", target="86.00")["epoch_mean"] == "never"


def test_paper_column_for_cifar100_resnet18(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "base", final_top1=76.0, epochs=200, dataset="cifar100", model="resnet18")
    write_run(runs, "tract", final_top1=76.5, epochs=200, dataset="cifar100", model="resnet18", lam=0.1)
    write_run(runs, "tract-0.2", final_top1=76.4, epochs=200, dataset="cifar100", model="resnet18", lam=0.2)
    write_run(runs, "in-r50", final_top1=75.0, epochs=90, dataset="imagenet_subset", classes="all",
              model="resnet50")

    written = report([str(runs)], tmp_path / "out")

    final = read_csv(written["final.csv"])
    assert row(final, model="resnet18", method="baseline")["paper_top1"] == "76.13"
    assert row(final, model="resnet18", method="tract", lam="0.1")["paper_top5"] == "93.29"
    assert row(final, model="resnet18", method="tract", lam="0.2")["paper_top1"] == ""  # paper: λ = 0.1 only
    assert row(final, dataset="imagenet_subset[all]")["paper_top1"] == "75.70"
    md = written["final.md"].read_text()
    assert "| 76.00 ± – | 76.13 |" in md and "| 76.50 ± – | 76.67 |" in md


def test_plots_are_written(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        for epochs in (4, 8):
            write_run(runs, f"b-e{epochs}-s{seed}", final_top1=90.0 + epochs / 4 + seed, epochs=epochs, seed=seed)
            for lam in (0.05, 0.1):
                write_run(runs, f"t{lam}-e{epochs}-s{seed}", final_top1=91.0 + epochs / 4 + seed, epochs=epochs,
                          seed=seed, lam=lam)

    written = report([str(runs)], tmp_path / "out")

    plots = sorted(name for name in written if name.endswith(".png"))
    assert plots == ["plots/budget_cifar10-resnet18-sgd_cosine.png",
                     "plots/curves_cifar10-resnet18-sgd_cosine-e4.png",
                     "plots/curves_cifar10-resnet18-sgd_cosine-e8.png",
                     "plots/lambda_cifar10-resnet18-sgd_cosine-e4.png",
                     "plots/lambda_cifar10-resnet18-sgd_cosine-e8.png"]
    for name in plots:
        data = written[name].read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_output_is_deterministic_and_main_prints_summary(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_run(runs, f"base-s{seed}", final_top1=90.0 + seed, seed=seed)
        write_run(runs, f"tract-s{seed}", final_top1=91.0 + seed / 3, seed=seed, lam=0.1)
    write_run(runs, "tract-running", final_top1=50.0, lam=0.1, seed=2, complete=False)

    assert main([str(runs), "--out", str(tmp_path / "a"), "--target", "90.5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 8 files to {tmp_path / 'a'}/" in printed and "| Dataset | Model |" in printed
    assert main([str(runs), "--out", str(tmp_path / "b"), "--target", "90.5"]) == 0

    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 8
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_transcribed_paper_tables_reproduce_the_papers_own_summaries():
    """Table 1's 36 rows average to the paper's stated 75.90/93.19 -> 76.39/93.42 with 33/36 top-1 wins."""
    from tract_bench.paper_values import CIFAR100_TABLE1

    rows = list(CIFAR100_TABLE1.values())
    assert len(rows) == 36
    means = [round(statistics.mean(r[i] for r in rows), 2) for i in range(4)]
    assert means == [75.90, 93.19, 76.39, 93.42]
    assert sum(r[2] > r[0] for r in rows) == 33 and sum(r[3] > r[1] for r in rows) == 34
