"""Sweeps through Hydra launchers: a 4-job multirun in parallel processes (joblib, submitit_local) gives 4 complete
run folders that tract-report aggregates; hydra/launcher=slurm writes the sbatch script we expect."""

import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import write_cifar

from tract_bench.report import report

pytestmark = pytest.mark.slow

# 2 seeds x (baseline, TrAct) of a one-epoch, one-block ViT on 10 x 20 images: a few seconds of training in all
SWEEP = ["-m", "model=vit_cifar", "model.dim=32", "model.depth=1", "model.heads=2", "model.mlp_dim=32", "epochs=1",
         "batch_size=20", "seed=0,1", "tract.lam=null,0.1", "device=cpu", "progress=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher_data")
    write_cifar(root, "cifar10", 20, 10, seed=0)
    return root


def tract_train(cwd, data, *args, env=None, timeout=240):
    """`tract-train args` in a fresh process (as a user runs it), with the tiny dataset as TRACT_DATA."""
    env = {**os.environ, "TRACT_DATA": str(data), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tract_bench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_sweep(proc, runs, tmp_path):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = sorted(runs.glob("*/*/summary.json"))
    assert len(summaries) == 4, summaries
    final = pd.read_csv(report([str(runs)], tmp_path / "report")["final.csv"])
    assert sorted(final["method"]) == ["baseline", "tract"] and list(final["n"]) == [2, 2]


def test_joblib_runs_jobs_in_parallel_processes(tmp_path, data):
    runs = tmp_path / "runs"
    proc = tract_train(tmp_path, data, *SWEEP, f"out_dir={runs}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    check_sweep(proc, runs, tmp_path)


def test_submitit_local(tmp_path, data):
    runs = tmp_path / "runs"
    proc = tract_train(tmp_path, data, *SWEEP, f"out_dir={runs}", "hydra/launcher=submitit_local",
                       "hydra.launcher.timeout_min=5", f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j")
    check_sweep(proc, runs, tmp_path)
    assert len(list((tmp_path / "submitit").glob("*/*_result.pkl"))) == 4  # one submitit job per run


def test_slurm_config_reaches_sbatch(tmp_path, data):
    """No cluster here: stand-in srun/sbatch let submitit build its job array; sbatch keeps the script and fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: recorded only" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sh"
    proc = tract_train(tmp_path, data, *SWEEP, f"out_dir={tmp_path / 'runs'}", "hydra/launcher=slurm",
                       "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=16",
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_COPY": str(script)})
    assert proc.returncode != 0 and "sbatch: recorded only" in proc.stderr
    lines = set(script.read_text().splitlines())
    assert {"#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=16GB", "#SBATCH --time=1440", "#SBATCH --array=0-3%4",
            "#SBATCH --job-name=tract-train"} <= lines, lines
