"""DDP under torchrun (gloo, 2 CPU processes): the same training as one process with the same global batch."""

import csv
import os
import subprocess
import sys

import pytest

TINY_VIT = ["model=vit_cifar", "model.dim=32", "model.depth=1", "model.heads=2", "model.mlp_dim=32"]


def run(tmp_path, root, out, nproc, *overrides):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    # A layer-norm ViT: no BatchNorm, whose per-rank statistics would (rightly) differ from one process's; fp32,
    # since bf16 rounds a half batch's sums differently from the whole batch's.
    cmd = [*launcher, "-m", "tract_bench.cli", *TINY_VIT, "epochs=2", "batch_size=40", "data.eval_batch_size=30",
           "data.download=false", f"out_dir={out}", "deterministic=true", "precision=fp32", *overrides]
    env = {**os.environ, "TRACT_DATA": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = (tmp_path / out).glob("*/*/")
    return folder, result.stdout


def metrics(folder):
    return [{k: float(v) for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")}
            for r in csv.DictReader(open(folder / "metrics.csv"))]


@pytest.mark.slow
@pytest.mark.parametrize("lam", ["null", "0.1"])
def test_ddp_matches_one_process_with_the_same_global_batch(tiny_cifar10_root, tmp_path, lam):
    overrides = [f"tract.lam={lam}", "tract.sync_gram=true"]
    single, _ = run(tmp_path, tiny_cifar10_root, "single", 1, *overrides)
    ddp, stdout = run(tmp_path, tiny_cifar10_root, "ddp", 2, *overrides)
    assert stdout.count("epoch 2/2") == 1  # only rank 0 logs and writes
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "config.yaml", "log.txt", "metrics.csv",
                                                     "summary.json"]
    for a, b in zip(metrics(single), metrics(ddp), strict=True):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        for key in ("train_loss", "test_loss", "train_acc", "test_top1", "test_top5"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_ddp_without_gram_sync_preconditions_per_rank(tiny_cifar10_root, tmp_path):
    """Each rank's Gram comes from its half of the batch: a (slightly) different step than one process."""
    single, _ = run(tmp_path, tiny_cifar10_root, "single", 1, "tract.lam=0.1")
    ddp, _ = run(tmp_path, tiny_cifar10_root, "ddp", 2, "tract.lam=0.1")
    assert metrics(single)[-1]["train_loss"] != metrics(ddp)[-1]["train_loss"]
