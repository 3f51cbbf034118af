"""tract-train: presets compose, a run writes its whole folder, resumes exactly, and refuses bad input."""

import csv
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import real_cifar_root
from tract_bench import train
from tract_bench.config import config_dir, register_resolvers
from tract_bench.errors import UserError
from tract_bench.optim import lr_factor

register_resolvers()
EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
TINY_VIT = ["model=vit_cifar", "model.dim=32", "model.depth=1", "model.heads=2", "model.mlp_dim=32"]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose("train", overrides=list(overrides))


def tiny_run(root, out, *overrides):
    return make_cfg(f"data.root={root}", f"out_dir={out}", "data.download=false", "epochs=1", "batch_size=20",
                    "data.eval_batch_size=37", "progress=false", *overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment):
    from tract_bench.config import validate

    cfg = make_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.epochs > 0 and cfg.optim.lr > 0


def test_paper_learning_rates_follow_the_budget():
    assert make_cfg("experiment=fig3_sgd", "epochs=800").optim.lr == 0.08
    assert [make_cfg("experiment=fig3_adam", f"epochs={e}").optim.lr for e in (100, 200, 400, 800)] == \
        [1e-2, 1e-2, 1e-3, 1e-3]
    assert [make_cfg("experiment=vit_cifar", f"epochs={e}").optim.lr for e in (100, 200, 400, 800)] == \
        [1e-3, 6.31e-4, 3.16e-4, 3.16e-4]
    official, measured = make_cfg(), make_cfg("dataset.normalization=measured")
    assert list(official.dataset.std) == [0.2023, 0.1994, 0.2010]
    assert list(measured.dataset.std) == [0.2470, 0.2435, 0.2616]


def test_schedules():
    sgd = make_cfg("optim=sgd_cosine").optim
    assert lr_factor(sgd, 0, 10, 100) == 1.0 and lr_factor(sgd, 500, 10, 100) == pytest.approx(0.5)
    assert lr_factor(sgd, 999, 10, 100) == pytest.approx(0.0, abs=1e-4)
    multi = make_cfg("optim=sgd_multistep").optim  # 1 warm-up epoch, x0.2 at 60/120/160 of 200
    assert lr_factor(multi, 0, 200, 10) == pytest.approx(0.1) and lr_factor(multi, 9, 200, 10) == 1.0
    factors = [lr_factor(multi, e * 10, 200, 10) for e in (59, 60, 119, 120, 159, 160, 199)]
    assert factors == pytest.approx([1, 0.2, 0.2, 0.04, 0.04, 0.008, 0.008])


def test_one_epoch_writes_the_whole_run_folder(tiny_cifar10_root, tmp_path, capsys, monkeypatch):
    cfg = tiny_run(tiny_cifar10_root, tmp_path, "tract.lam=0.1")
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1))  # the process-wide CPU setting
    folder = train.run(cfg)
    assert calls == [1]
    assert folder.parent.parent == tmp_path and folder.name.startswith("e1-tract0.1-s0-")
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "metrics.csv", "summary.json", "log.txt",
                                                  "checkpoints"}
    assert (folder / "checkpoints" / "last.pt").is_file()
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_top1",
                             "test_top5", "epoch_seconds", "images_per_second"]
    assert len(rows) == 1 and rows[0]["step"] == "10"  # 200 images / batch 20
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs_completed"] == 1
    assert summary["tract"] == {"layer": "conv1", "n": 27, "lam": 0.1}
    assert summary["normalization"]["std"] == [0.2023, 0.1994, 0.2010]
    assert summary["data"]["test_images"] == 100 and summary["final"]["test_top1"] == float(rows[0]["test_top1"])
    for key in ("device", "torch", "timm", "git_commit", "wall_seconds"):
        assert key in summary
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and f"layout: {summary['layout']}, the fastest of 6 timed on this CPU" in out

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert train.run(cfg) == folder  # the same command again: skipped, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert "finished already" in capsys.readouterr().out


def run_interrupted(cfg, epoch, monkeypatch):
    """Run cfg until it is killed (KeyboardInterrupt) at the start of `epoch`."""
    calls, real_epoch = [], train.train_epoch

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_epoch", crash)
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg)


def test_interrupted_run_resumes_to_identical_metrics(tiny_cifar10_root, tmp_path, monkeypatch):
    args = ["epochs=3", "deterministic=true", "tract.lam=0.05", "dataset.augment.rotation=10"]
    whole = train.run(tiny_run(tiny_cifar10_root, tmp_path / "a", *args))
    cfg = tiny_run(tiny_cifar10_root, tmp_path / "b", *args)
    run_interrupted(cfg, 3, monkeypatch)
    folder = train.rundir.run_path(cfg)
    assert not (folder / "summary.json").exists() and len(list(csv.DictReader(open(folder / "metrics.csv")))) == 2
    assert train.run(cfg) == folder

    def results(f):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")}
                for r in csv.DictReader(open(f / "metrics.csv"))]

    assert results(folder) == results(whole) and len(results(folder)) == 3
    a, b = (torch.load(f / "checkpoints" / "last.pt", weights_only=False)["model"] for f in (whole, folder))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_layout_is_timed_once_and_kept_on_resume(tiny_cifar10_root, tmp_path, monkeypatch):
    """channels_last=auto on a CPU: the layout is timed before the first epoch, on the run's batch shape; the
    checkpoint keeps it, and a resumed run takes it from there without timing again."""
    calls = []
    monkeypatch.setattr(train.layout, "tune", lambda model, shape, classes, amp: calls.append((shape, classes))
                        or "layer3")
    cfg = tiny_run(tiny_cifar10_root, tmp_path, "epochs=2")
    run_interrupted(cfg, 2, monkeypatch)
    assert calls == [((20, 3, 32, 32), 10)]
    folder = train.run(cfg)
    assert len(calls) == 1
    assert json.loads((folder / "summary.json").read_text())["layout"] == \
        "channels_last (nchw from layer3), 2x2 maps as matmuls"
    checkpoint = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["nchw_from"] == "layer3" and checkpoint["small_maps"] is True


def test_a_run_from_before_small_maps_resumes_with_plain_convolutions(tiny_cifar10_root, tmp_path, monkeypatch):
    cfg = tiny_run(tiny_cifar10_root, tmp_path, "epochs=2", "deterministic=true")
    run_interrupted(cfg, 2, monkeypatch)
    path = train.rundir.run_path(cfg) / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint.pop("small_maps") is True
    torch.save(checkpoint, path)  # as written before tract_bench.smallmap
    folder = train.run(cfg)
    assert json.loads((folder / "summary.json").read_text())["layout"] == "channels_last"


@pytest.mark.parametrize("overrides,expected", [
    (["channels_last=true"], "channels_last"),
    (["channels_last=false"], "nchw"),
    (["deterministic=true"], "channels_last, 2x2 maps as matmuls"),
    (["precision=fp16", "data.train_subset=20", "data.test_subset=10"], "channels_last")])
def test_layouts_that_are_not_timed(tiny_cifar10_root, tmp_path, monkeypatch, overrides, expected):
    monkeypatch.setattr(train.layout, "tune", lambda *a: pytest.fail("the layout was timed"))
    folder = train.run(tiny_run(tiny_cifar10_root, tmp_path, *overrides))
    assert json.loads((folder / "summary.json").read_text())["layout"] == expected


def test_resume_refuses_a_different_precision(tiny_cifar10_root, tmp_path, monkeypatch):
    """precision=auto resolves per machine: a run started in fp32 must not silently continue in bf16."""
    cfg = tiny_run(tiny_cifar10_root, tmp_path, *TINY_VIT, "epochs=2")
    run_interrupted(cfg, 2, monkeypatch)
    monkeypatch.setattr(train, "resolve_precision", lambda precision, device: "bf16")
    with pytest.raises(UserError, match="trained in fp32 so far.*resume with precision=fp32"):
        train.run(cfg)


def test_fp16_steps_the_scaler_skips_are_left_out_of_the_means():
    """An fp16 step GradScaler skips is not a divergence; every step skipped is one, and so is an infinite loss
    on a step that was taken (a -inf logit: finite gradients, weights updated)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    small, huge = torch.randn(8, 4), torch.full((8, 4), 1e6)  # huge is inf once cast to fp16: NaN/inf gradients
    y = torch.zeros(8, dtype=torch.long)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    constant = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)

    def epoch(batches, dtype=torch.float16, scaled=True):
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, enabled=scaled)
        return train.train_epoch(model, batches, sgd, constant, scaler, torch.nn.CrossEntropyLoss(), dtype,
                                 torch.device("cpu"), False)

    before = model.weight.detach().clone()
    loss, acc, seen, skipped = epoch([(huge, y)])
    assert torch.equal(model.weight, before) and (seen, skipped) == (8, 1) and math.isnan(loss) and math.isnan(acc)
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(model(small), y).item()
    loss, _, seen, skipped = epoch([(huge, y), (small, y)])
    assert (seen, skipped) == (16, 1) and loss == pytest.approx(reference, rel=1e-2)  # the one step taken
    loss, _, _, skipped = epoch([(huge, y), (small, y)], None, False)
    assert skipped == 0 and math.isfinite(loss) and loss > 1e4  # fp32: the huge batch is a real (absurd) loss

    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-100.0] * 4, [0.01] * 4, [0.02] * 4]))
        model.bias.zero_()
    loss, _, _, skipped = epoch([(torch.full((8, 4), 1000.0), y)])  # the target logit is -inf: loss inf
    assert skipped == 0 and loss == math.inf and not torch.equal(model.weight[0], torch.full((4,), -100.0))


def test_device_names_are_checked():
    assert train.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="device=gpu0 is not a torch device"):
        train.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible"):
            train.resolve_device("cuda")


@pytest.mark.slow
def test_compiled_run_resumes_uncompiled(tiny_cifar10_root, tmp_path, monkeypatch):
    """Checkpoints hold the uncompiled weights, so a torch.compile run resumes without compile (same folder)."""
    compiled = tiny_run(tiny_cifar10_root, tmp_path, *TINY_VIT, "epochs=2", "tract.lam=0.1", "compile=true")
    run_interrupted(compiled, 2, monkeypatch)
    folder = train.run(tiny_run(tiny_cifar10_root, tmp_path, *TINY_VIT, "epochs=2", "tract.lam=0.1"))
    assert folder == train.rundir.run_path(compiled)
    assert json.loads((folder / "summary.json").read_text())["epochs_completed"] == 2
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert "emb.weight" in state and not any(k.startswith("_orig_mod") for k in state)


@pytest.mark.parametrize("overrides,message", [
    (["tract.lam=0"], "tract.lam=0"),
    (["tract.lam=-0.1"], "tract.lam=-0.1"),
    (["tract.lam=nan"], "tract.lam=nan"),
    (["epochs=0"], "epochs=0"),
    (["batch_size=-4"], "batch_size=-4"),
    (["model=timm", "model.name=no_such_net"], "unknown timm model 'no_such_net'"),
    (["model=timm", "model.name=vit_tiny_patch16_224"], "does not fit 32x32 images"),
    (["batch_size=1000"], "batch_size=1000 exceeds"),
    (["tract.lam=0.1", "tract.layer=fc.nope"], "no layer 'fc.nope'"),
])
def test_bad_input_is_refused_before_anything_is_written(tiny_cifar10_root, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train.run(tiny_run(tiny_cifar10_root, tmp_path / "out", *overrides))
    assert not (tmp_path / "out").exists()


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "tract_bench.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    for args, message in [(["tract.lam=-1"], "tract.lam=-1"), (["data.download=false"], "TRACT_DATA")]:
        result = cli(*args, "out_dir=out", env={"TRACT_DATA": str(empty)}, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tract-train: error:") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodata"]  # no run folder, no Hydra outputs


@pytest.mark.slow
def test_cli_runs_from_any_directory(tiny_cifar10_root, tmp_path):
    result = cli(*TINY_VIT, "epochs=1", "batch_size=50", "tract.lam=0.1", "out_dir=runs",
                 env={"TRACT_DATA": str(tiny_cifar10_root)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (summary,) = tmp_path.glob("runs/cifar10-vit_cifar-sgd_cosine/e1-tract0.1-s0-*/summary.json")
    assert json.loads(summary.read_text())["tract"] == {"layer": "emb", "n": 48, "lam": 0.1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """A non-editable install finds conf/ inside the package, and every conf/ subfolder is a listed package
    (setuptools warns that it may drop unlisted ones)."""
    repo = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                            str(tmp_path), str(repo)], check=True, timeout=300, capture_output=True, text=True)
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("tract_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"tract_bench/conf/{p.relative_to(repo / 'conf')}" for p in (repo / "conf").rglob("*")
                if p.is_file()}
    assert expected <= names and "tract_bench/conf/train.yaml" in names


@pytest.mark.slow
def test_smoke_experiment_learns_real_cifar10(tmp_path):
    """experiment=smoke on the real CIFAR-10 (TRACT_DATA; CI sets it) ends well above chance (10 %)."""
    root = real_cifar_root("cifar10")
    folder = train.run(make_cfg("experiment=smoke", f"data.root={root}", f"out_dir={tmp_path}", "progress=false"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["data"]["train_images"] == 5000 and summary["data"]["test_images"] == 1000
    assert summary["final"]["test_top1"] > 25.0
