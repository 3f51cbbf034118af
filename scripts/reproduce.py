"""`make reproduce EXP=... SCALE=...`: the paper's experiments as Hydra multiruns of tract-train, then tract-report.

Every sweep is in the table below. A scale changes only the budgets, seeds and data size, never the protocol:
  paper  the paper's protocol exactly (budgets, learning rates, lambdas, 5 seeds)
  short  the same shape at small budgets and 1 seed: a few minutes on one large GPU
  smoke  real CIFAR on a 2-core CPU: a class-balanced subset, budgets of 1-4 epochs, 1-3 seeds (~20 min for fig3_sgd)
Finished runs are skipped and interrupted ones resumed (tract-train does that), so re-running after a failure
only does what is missing. Runs go to runs/<scale>/<exp>/, the report to results/<exp>_<scale>/.
"""

import argparse
import subprocess
import sys
from pathlib import Path

PAPER_LAMS = "null,0.05,0.1,0.2"
SWEEP_LAMS = "null,0.00625,0.0125,0.025,0.05,0.1,0.2,0.4,0.8,1.6"  # paper Fig. 6
SEEDS5 = "0,1,2,3,4"
SMOKE_DATA = ["data.train_subset=4000", "data.test_subset=1000"]
# The smoke runs take only ~30 steps per epoch, too few to recover from the paper's first SGD steps at lr 0.08.
SMOKE_SGD = ["optim.lr=0.02"]

SWEEPS = {  # (experiment, scale) -> overrides; comma lists are swept by Hydra's multirun
    ("fig3_sgd", "paper"): ["epochs=100,200,400,800", f"tract.lam={PAPER_LAMS}", f"seed={SEEDS5}"],
    ("fig3_sgd", "short"): ["epochs=3,6,12,24", f"tract.lam={PAPER_LAMS}", "seed=0"],
    ("fig3_sgd", "smoke"): ["epochs=1,2,4", "tract.lam=null,0.1", "seed=0,1,2", *SMOKE_DATA, *SMOKE_SGD],
    ("fig3_adam", "paper"): ["epochs=100,200,400,800", f"tract.lam={PAPER_LAMS}", f"seed={SEEDS5}"],
    ("fig3_adam", "short"): ["epochs=3,6,12,24", f"tract.lam={PAPER_LAMS}", "seed=0"],
    ("fig3_adam", "smoke"): ["epochs=1,2,4", "tract.lam=null,0.1", "seed=0,1,2", *SMOKE_DATA],
    ("cifar100", "paper"): ["model.name=resnet18,resnet34,resnet50", "tract.lam=null,0.1", f"seed={SEEDS5}"],
    ("cifar100", "short"): ["model.name=resnet18", "epochs=15,30", "tract.lam=null,0.1", "seed=0"],
    ("cifar100", "smoke"): ["epochs=2,4", "tract.lam=null,0.1", "seed=0,1", "data.train_subset=5000",
                            "data.test_subset=1000"],
    ("vit_cifar", "paper"): ["epochs=100,200,400,800", f"tract.lam={PAPER_LAMS}", f"seed={SEEDS5}"],
    ("vit_cifar", "short"): ["epochs=5,10,20", f"tract.lam={PAPER_LAMS}", "seed=0", "optim.warmup_epochs=1"],
    ("vit_cifar", "smoke"): ["epochs=2,4", "tract.lam=null,0.1", "seed=0,1", *SMOKE_DATA, "optim.warmup_epochs=0"],
    ("lambda_sweep", "paper"): ["epochs=200", f"tract.lam={SWEEP_LAMS}", f"seed={SEEDS5}"],
    ("lambda_sweep", "short"): ["epochs=10", f"tract.lam={SWEEP_LAMS}", "seed=0", "optim.warmup_epochs=1"],
    ("lambda_sweep", "smoke"): ["epochs=3", "tract.lam=null,0.0125,0.05,0.2,0.8", "seed=0", *SMOKE_DATA,
                                "optim.warmup_epochs=0"],
}
PRESET = {"lambda_sweep": "vit_cifar"}  # experiments that are a sweep over another preset
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib"], "slurm": ["hydra/launcher=slurm"]}


def commands(exp: str, scale: str, launcher: str, extra: list[str]) -> list[list[str]]:
    """The tract-train multirun and the tract-report call for one experiment at one scale."""
    runs, results = Path("runs") / scale / exp, Path("results") / f"{exp}_{scale}"
    train = [sys.executable, "-m", "tract_bench.cli", "-m", f"experiment={PRESET.get(exp, exp)}",
             *SWEEPS[exp, scale], *LAUNCHERS[launcher], f"out_dir={runs}", *extra]
    report = [sys.executable, "-m", "tract_bench.report", str(runs), "--out", str(results)]
    return [train, report]


def main(argv=None):
    experiments = sorted({e for e, _ in SWEEPS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, choices=[*experiments, "all"])
    parser.add_argument("--scale", default="smoke", choices=["smoke", "short", "paper"])
    parser.add_argument("--launcher", default="basic", choices=list(LAUNCHERS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*", help="extra tract-train overrides, e.g. device=cuda:1")
    args = parser.parse_args(argv)
    for exp in experiments if args.exp == "all" else [args.exp]:
        for cmd in commands(exp, args.scale, args.launcher, args.overrides):
            print("+", " ".join(cmd[1:]), flush=True)
            if not args.dry_run:
                subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
