"""The benchmark scripts: the fast and reference loops compute the same thing, and both scripts run end to end."""

import argparse
import copy
import csv
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_report  # noqa: E402
import bench_tract  # noqa: E402
import bench_train  # noqa: E402
import grad_precision  # noqa: E402
import reference_loop  # noqa: E402
import step_profile  # noqa: E402
import swap_pipelines  # noqa: E402
from tract_bench import layout, smallmap  # noqa: E402
from tract_bench.models import resnet_cifar  # noqa: E402

CPU = torch.device("cpu")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fast_and_reference_loops_agree_without_augmentation(tiny_cifar10_root):
    """Same images in the same order, same normalisation, same init, both in fp32: same batches and the same loss
    each step."""
    data, real = bench_train.load_data(tiny_cifar10_root)
    assert real
    torch.manual_seed(0)
    init = resnet_cifar("resnet18", 10)
    test_set = reference_loop.CifarImages(data.test_x, data.test_y, reference_loop.TEST_TRANSFORM)

    def loops(nchw_from="auto", same_kernels=False):
        reference = copy.deepcopy(init)
        if same_kernels:  # the fast loop's 2x2-map matrix products, not the convolutions there
            smallmap.convert(reference, (3, 32, 32))
        return (bench_train.FastLoop(copy.deepcopy(init), data, 16, CPU, total_steps=3, precision="fp32",
                                     nchw_from=nchw_from),
                reference_loop.ReferenceLoop(reference, test_set, test_set, 16, CPU, total_steps=3))

    fast, ref = loops()
    # the test loaders: storage order, no augmentation
    xf, yf = next(iter(fast.test_loader))
    xr, yr = next(iter(ref.test_loader))
    k = min(len(yf), len(yr))
    assert torch.equal(yf[:k], yr[:k])
    torch.testing.assert_close(xf[:k], xr[:k], rtol=1e-6, atol=1e-6)
    # a step on each loop's own batch, the fast one in its timed layout: the same loss up to rounding
    assert fast.train([(xf[:16], yf[:16])]) == pytest.approx(ref.train([(xr[:16], yr[:16])]), rel=1e-5)
    # three steps on one shared NCHW tensor: equal losses mean equal forward passes, updates and learning rates. Both
    # run the same kernels here: the fast loop NCHW throughout (the layout it times differs by CPU), the reference
    # model with the fast loop's 2x2-map matrix products; other kernels' rounding grows to ~1e-4 by the third step
    # at this batch (test_layout and test_smallmap cover those)
    fast, ref = loops(nchw_from=layout.switch_points(init)[0], same_kernels=True)
    x = xf[:16].contiguous()  # an NHWC input would take the reference model's convolutions to NHWC
    for _ in range(3):
        assert fast.train([(x, yf[:16])]) == pytest.approx(ref.train([(x, yf[:16])]), rel=1e-6)
    assert fast.scheduler.get_last_lr() == pytest.approx(ref.scheduler.get_last_lr(), abs=1e-12)


def test_reference_process_trains_as_the_reference_loop_here(tiny_cifar10_root):
    """The reference loops in their own process start from the same initialisation and data stream as built here:
    a whole augmented epoch ends at the same loss and test accuracy, and errors there are raised here."""
    data, _ = bench_train.load_data(tiny_cifar10_root)
    args = argparse.Namespace(batch_size=32, precision="fp32", compile=False)
    key = ("resnet18_cifar", "tract", "reference")
    here = bench_train.build_loops(args, ["resnet18_cifar"], data, CPU, 10, seed=1, kinds=("reference",))[key]
    with bench_train.ReferenceProcess(args, ["resnet18_cifar"], data, CPU, 10, seed=1) as process:
        there = process.handles(["resnet18_cifar"])[key]
        assert bench_train.run(there, bench_train.train_epochs, 1) == pytest.approx(
            bench_train.train_epochs(here, 1), rel=1e-5)
        assert bench_train.run(there, bench_train.evaluate_top1) == pytest.approx(here.test_top1())
        with pytest.raises(RuntimeError, match="reference process"):
            bench_train.run(there, bench_train.train_epochs, "one")
    assert process.process.exitcode == 0


def test_train_loaders_agree_on_shape_and_normalisation(tiny_cifar10_root):
    """Augmented batches of both loops: same shape and dtype, standardised with the same constants."""
    data, _ = bench_train.load_data(tiny_cifar10_root)
    fast = bench_train.FastLoop(resnet_cifar("resnet18", 10), data, 32, CPU, total_steps=1)
    train_set = reference_loop.CifarImages(data.train_x, data.train_y, reference_loop.TRAIN_TRANSFORM)
    ref = reference_loop.ReferenceLoop(resnet_cifar("resnet18", 10), train_set, train_set, 32, CPU, total_steps=1)
    assert len(fast.loader) == len(ref.loader) == len(data.train_x) // 32  # both drop the last partial batch
    xf, yf = next(fast.batches())
    xr, yr = next(ref.batches())
    assert xf.shape == xr.shape == (32, 3, 32, 32) and xf.dtype == xr.dtype == torch.float32
    assert yf.dtype == yr.dtype == torch.int64
    # zero padding maps to -mean/std in both: the smallest value of a padded channel
    low = torch.tensor([-m / s for m, s in zip(reference_loop.MEAN, reference_loop.STD)])
    assert (xf.amin((0, 2, 3)) >= low - 1e-5).all() and (xr.amin((0, 2, 3)) >= low - 1e-5).all()
    assert list(bench_train.DATASET.mean) == list(reference_loop.MEAN)
    assert list(bench_train.DATASET.std) == list(reference_loop.STD)


def test_synthetic_fallback(tmp_path, capsys):
    data, real = bench_train.load_data(tmp_path / "missing", synthetic_sizes=(64, 16))
    assert not real and "synthetic" in capsys.readouterr().out
    assert data.train_x.shape == (64, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_y.shape == (16,) and int(data.train_y.max()) < 10


def test_bench_train_end_to_end(tiny_cifar10_root, tmp_path):
    rows, checks = bench_train.main(["--steps", "2", "--warmup", "1", "--reps", "2", "--batch-size", "16",
                                     "--models", "resnet18_cifar", "--data", str(tiny_cifar10_root),
                                     "--out-dir", str(tmp_path)])
    written = read_csv(tmp_path / "bench.csv")
    assert len(written) == 4 and list(written[0]) == list(rows[0])
    assert {(r["method"], r["loop"]) for r in written} == {(m, loop) for m in ("baseline", "tract")
                                                           for loop in ("fast", "reference")}
    # tract-train's CPU defaults: fp32 in the layout timed fastest (tract_bench.layout); the reference: fp32, NCHW
    fast = {r["method"]: r["precision"] for r in written if r["loop"] == "fast"}
    assert all(label.startswith(("fp32+channels_last", "fp32+nchw")) for label in fast.values())
    assert {r["precision"] for r in written if r["loop"] == "reference"} == {"fp32"}
    for r in written:
        assert float(r["images_per_s"]) > 0 and float(r["epoch_s"]) > 0
        assert (r["tract_overhead_pct"] != "") == (r["method"] == "tract")
        if r["loop"] == "reference":
            assert float(r["ratio_to_reference"]) == 1.0
    md = (tmp_path / "bench.md").read_text()
    assert "| resnet18_cifar | tract | fast |" in md
    verdicts = [line for line in md.splitlines() if line.startswith(("- PASS", "- MISS"))]
    assert len(checks) == len(verdicts) == 2  # CPU: one ratio target per method
    assert all(f"{method} (fast loop: {fast[method]})" in line  # the settings the target saw
               for method, line in zip(("baseline", "tract"), verdicts))
    assert not (tmp_path / "bench_accuracy.csv").exists()


@pytest.mark.slow
def test_bench_train_epochs_and_accuracy_modes(tiny_cifar10_root, tmp_path):
    bench_train.main(["--epochs", "1", "--warmup", "1", "--reps", "1", "--batch-size", "32", "--accuracy-epochs", "1",
                      "--accuracy-seeds", "2", "--accuracy-train-subset", "100", "--models", "resnet18_cifar",
                      "--data", str(tiny_cifar10_root), "--out-dir", str(tmp_path)])
    assert len(read_csv(tmp_path / "bench.csv")) == 4
    acc = read_csv(tmp_path / "bench_accuracy.csv")
    assert len(acc) == 8 and {r["seed"] for r in acc} == {"0", "1"}
    assert all(0 <= float(r["test_top1"]) <= 100 and r["train_images"] == "100" for r in acc)
    md = (tmp_path / "bench.md").read_text()
    assert "## Test top-1 after 1 epochs on 100 training images (2 seed(s)" in md
    assert len([line for line in md.splitlines() if line.startswith("| resnet18_cifar | ") and " / " in line]) == 2


def test_accuracy_mode_refuses_synthetic_data(tmp_path):
    with pytest.raises(SystemExit):
        bench_train.main(["--accuracy-epochs", "1", "--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])


def test_accuracy_table_gives_mean_std_and_difference():
    rows = [{"model": "m", "method": "baseline", "loop": loop, "seed": seed, "epochs": 2, "train_images": 100,
             "test_top1": top1} for seed, (f, r) in enumerate([(50.0, 48.0), (52.0, 50.0)])
            for loop, top1 in (("fast", f), ("reference", r))]
    table = bench_report.accuracy_table(rows)
    assert "| m | baseline | 51.00 ± 1.41 | 49.00 ± 1.41 | +2.00 | 50.00 / 48.00, 52.00 / 50.00 |" in table


def test_bench_train_summary_and_targets():
    """Ratios and overheads are medians of per-repetition pairs; targets depend on the device."""
    ips = {("resnet18_cifar", "baseline", "fast"): [300.0, 200.0, 330.0],
           ("resnet18_cifar", "baseline", "reference"): [100.0, 100.0, 100.0],
           ("resnet18_cifar", "tract", "fast"): [290.0, 190.0, 320.0],
           ("resnet18_cifar", "tract", "reference"): [100.0, 90.0, 100.0]}

    class Args:
        batch_size = 128

    labels = {("resnet18_cifar", "baseline"): "fp32+nchw", ("resnet18_cifar", "tract"): "fp32+channels_last"}
    rows = bench_report.summarise(ips, labels, Args, CPU, "synthetic", "test")
    by = {(r["method"], r["loop"]): r for r in rows}
    assert [by["baseline", "fast"]["precision"], by["tract", "reference"]["precision"]] == ["fp32+nchw", "fp32"]
    assert by["baseline", "fast"]["ratio_to_reference"] == 3.0  # pairs 3.0, 2.0, 3.3
    assert by["tract", "fast"]["tract_overhead_pct"] == pytest.approx(100 * (300 / 290 - 1), abs=0.01)
    assert by["baseline", "fast"]["epoch_s"] == pytest.approx(390 * 128 / 300, abs=1e-3)
    cpu_checks = bench_report.check_targets(rows, CPU)
    assert [ok for _, _, ok in cpu_checks] == [True, True]
    gpu_checks = bench_report.check_targets(rows, torch.device("cuda"))
    assert len(gpu_checks) == 5  # ratio and epoch time per method, overhead of the one TrAct fast loop
    assert not any(ok for target, _, ok in gpu_checks if "epoch" in target)  # 166 s, not 1.5 s


def test_bench_tract_interleaves_in_abba_order(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_tract, "train_step", lambda model, *a: calls.append(model))
    models = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]  # stand-ins: the optimizers need parameters
    times = bench_tract.time_interleaved(models, None, None, None, False, steps=3, warmup=1, device=CPU)
    assert [models.index(m) for m in calls] == [0, 1, 1, 0, 0, 1, 1, 0]
    assert [len(t) for t in times] == [3, 3]  # the warm-up pair is not timed


def test_bench_tract_twins_and_overhead(monkeypatch):
    """The TrAct model starts from the baseline's weights; the overhead and its check follow the medians."""

    def fake_timing(models, x, y, amp_dtype, scaled, steps, warmup, device):
        base, tract = (m.state_dict() for m in models)
        assert base.keys() == tract.keys() and all(torch.equal(base[k], tract[k]) for k in base)
        assert type(models[1].get_submodule("conv1")).__name__ == "TrActConv2d"
        return [[1.0, 1.0, 5.0], [1.025, 1.025, 0.1]]  # medians 1.0 and 1.025

    monkeypatch.setattr(bench_tract, "time_interleaved", fake_timing)

    class Args:
        steps, warmup, batch = 3, 0, 2

    (row,) = bench_tract.bench_model("resnet18_cifar", Args, CPU)
    assert row["overhead_pct"] == 2.5 and row["check"] == "PASS" and row["tract_n"] == 27


def test_bench_tract_end_to_end(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_tract, "keep_freed_memory", lambda: calls.append(1))  # as a CPU tract-train run
    out = tmp_path / "tract.csv"
    bench_tract.main(["--steps", "2", "--warmup", "1", "--batch", "4", "--models", "resnet18_cifar", "vit_cifar",
                      "--out", str(out)])
    rows = read_csv(out)
    assert [(r["model"], r["tract_layer"], r["tract_n"]) for r in rows] == [
        ("resnet18_cifar", "conv1", "27"), ("vit_cifar", "emb", "48")]
    # the layout timed fastest on this CPU for the ResNet; the ViT has no convolution, so nothing to time
    assert rows[0]["precision"].startswith(("fp32+channels_last", "fp32+nchw"))
    assert rows[1]["precision"] == "fp32+channels_last"
    for r in rows:
        assert float(r["ms_step_baseline"]) > 0 and float(r["ms_step_tract"]) > 0
        assert r["check"] in ("PASS", "MISS")
        assert float(r["overhead_pct"]) == pytest.approx(
            100 * (float(r["ms_step_tract"]) / float(r["ms_step_baseline"]) - 1), abs=0.05)
    assert calls == [1]


def test_bench_tract_imagenet_resnet50(tmp_path):
    out = tmp_path / "tract.csv"
    bench_tract.main(["--steps", "1", "--warmup", "0", "--batch", "2", "--models", "resnet50_imagenet",
                      "--out", str(out)])
    (row,) = read_csv(out)
    assert (row["tract_n"], row["image_size"], row["check"]) == ("147", "224", "")


def test_step_profile_counts_forward_and_backward_work(monkeypatch, tmp_path):
    """A step is 3x the forward's FLOPs (output, input and weight gradients), less the stem's input gradient,
    which the image does not need; FLOPs as run, 2x2-map convolutions as matrix products included. On a CPU the
    script keeps freed memory, as a tract-train run does."""
    from torch.utils.flop_counter import FlopCounterMode
    calls = []
    monkeypatch.setattr(bench_tract, "keep_freed_memory", lambda: calls.append(1))
    out = tmp_path / "profile.txt"
    result = step_profile.main(["--steps", "2", "--warmup", "1", "--batch", "2", "--top", "3", "--out", str(out)])
    counter = FlopCounterMode(display=False)
    model = resnet_cifar("resnet18", 10)
    assert smallmap.convert(model, (3, 32, 32)) == 3  # as the script's model on a CPU
    with counter:
        model(torch.randn(2, 3, 32, 32))
    stem = 2 * 2 * 32 * 32 * 64 * 27  # batch 2, 32x32 outputs, 64 channels, 3x3x3 inputs each, multiply-add
    assert result["flops_per_step"] == 3 * counter.get_total_flops() - stem
    assert result["precision"].startswith(("fp32+channels_last", "fp32+nchw"))
    assert result["precision"].endswith(", 2x2 maps as matmuls")
    assert result["gflops_matmul"] > 0 < result["gflops_conv3x3"]
    assert "% of the faster" in out.read_text() and calls == [1]


@pytest.mark.parametrize("flags,message", [
    (["--accuracy-seeds", "3"], "--accuracy-seeds applies to the accuracy runs: add --accuracy-epochs N"),
    (["--accuracy-epochs", "1", "--accuracy-train-subset", "20", "--batch-size", "32"],
     "--accuracy-train-subset 20 is smaller than --batch-size 32"),
    (["--accuracy-epochs", "1", "--accuracy-train-subset", "5"],
     "--accuracy-train-subset 5: subset size 5 is smaller than the 10 classes"),
])
def test_accuracy_options_are_checked_before_any_timing(tiny_cifar10_root, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        bench_train.main([*flags, "--data", str(tiny_cifar10_root), "--out-dir", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.csv").exists()


def test_reference_loop_order_depends_on_its_seed_alone(tiny_cifar10_root):
    data, _ = bench_train.load_data(tiny_cifar10_root)
    images = reference_loop.CifarImages(data.train_x, data.train_y, reference_loop.TEST_TRANSFORM)

    def labels(seed):
        return torch.cat([y for _, y in reference_loop.reference_loader(images, 50, train=True, seed=seed)])

    first = labels(0)
    torch.rand(3)  # other use of the global RNG in between
    assert torch.equal(labels(0), first) and not torch.equal(labels(1), first)


@pytest.mark.parametrize("mode", ["ref_on_fast_data", "fast_on_ref_data"])
def test_swap_pipelines_runs_each_way(tiny_cifar10_root, mode):
    top1 = swap_pipelines.main([mode, "--seeds", "0", "1", "--epochs", "1", "--batch-size", "32",
                                "--train-subset", "100", "--data", str(tiny_cifar10_root)])
    assert len(top1) == 2 and all(0 <= t <= 100 for t in top1)


def test_grad_precision_orders_the_formats(capsys):
    """Rounding error grows from another fp32 summation order to fp16 to bf16 (fewer mantissa bits each)."""
    errors = grad_precision.main(["--batch", "8"])
    assert set(errors) == {"fp32 NCHW", "bf16", "fp16"} and "conv1.weight" in errors["bf16"]
    median = {label: sorted(e.values())[len(e) // 2] for label, e in errors.items()}
    assert median["fp32 NCHW"] < median["fp16"] < median["bf16"]
    assert "stem conv" in capsys.readouterr().out


@pytest.mark.slow
def test_device_check_script_runs_every_step_on_a_cpu(tiny_cifar10_root, tmp_path):
    """scripts/device_check.sh is what a GPU session runs in its few minutes: every step but nvidia-smi must work here
    (tiny settings), writing each file it promises, and the bundle packed after the last step holds them all."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TRACT_ARGS": "--steps 1 --warmup 0 --batch 2 --models resnet18_cifar",
           "PROFILE_ARGS": "--steps 1 --warmup 0 --batch 8",
           "BENCH_ARGS": "--steps 1 --warmup 0 --reps 1 --batch-size 32 --models resnet18_cifar",
           "ACCURACY": "--accuracy-epochs 1 --accuracy-train-subset 100",
           "PRECISION": "epochs=1 seed=0 batch_size=20 data.train_subset=100 data.eval_batch_size=50",
           "RUNS_DIR": str(tmp_path / "runs"), "BUNDLE": str(tmp_path / "bundle.tgz")}
    out = tmp_path / "out"
    script = subprocess.Popen(["bash", "scripts/device_check.sh", str(tiny_cifar10_root), str(out)], cwd=repo,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        script.wait(timeout=900)
    finally:  # a hung step: end it and its workers too, not only bash
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    log = (out / "log.txt").read_text()
    exits = dict(re.findall(r"^== (\S+): exit (\d+) after", log, re.M))
    assert list(exits) == ["gpu", "cuda-tests", "bench-tract", "step-profile", "bench", "precision-bf16",
                           "report-bf16", "precision-fp32", "report-fp32"], log[-3000:]
    assert all(code == "0" for step, code in exits.items() if step != "gpu"), log[-3000:]
    for name in ("bench.csv", "bench.md", "bench_accuracy.csv", "bench_tract.csv", "step_profile.txt",
                 "precision/bf16/final.csv", "precision/fp32/final.csv"):
        assert (out / name).stat().st_size > 0, name
    with tarfile.open(tmp_path / "bundle.tgz") as bundle:  # packed after the last step: everything
        assert {f"./{p.relative_to(out)}" for p in out.rglob("*")} <= set(bundle.getnames())
