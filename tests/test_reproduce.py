"""make reproduce: every experiment x scale is a valid sweep of tract-train configs."""

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tract_bench.config import config_dir, register_resolvers, validate

register_resolvers()
spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


@pytest.mark.parametrize("exp,scale", sorted(reproduce.SWEEPS), ids=[f"{e}-{s}" for e, s in sorted(reproduce.SWEEPS)])
def test_every_sweep_point_is_a_valid_config(exp, scale):
    train, report = reproduce.commands(exp, scale, "basic", [])
    overrides = train[train.index("-m", 2) + 1:]
    swept = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in overrides]
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        for combo in ([values[0] for values in swept], [values[-1] for values in swept]):
            cfg = compose("train", overrides=combo)
            validate(cfg)
            assert cfg.out_dir == f"runs/{scale}/{exp}"
    assert report[-3:] == [f"runs/{scale}/{exp}", "--out", f"results/{exp}_{scale}"]


def test_paper_scale_is_the_paper_protocol():
    sweep = dict(o.split("=", 1) for o in reproduce.SWEEPS["fig3_sgd", "paper"])
    assert sweep == {"epochs": "100,200,400,800", "tract.lam": "null,0.05,0.1,0.2", "seed": "0,1,2,3,4"}
    assert "tract.lam=null,0.1" in reproduce.SWEEPS["cifar100", "paper"]


def test_dry_run_prints_the_commands(capsys):
    reproduce.main(["--exp", "fig3_sgd", "--scale", "smoke", "--launcher", "joblib", "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("+ -m tract_bench.cli -m experiment=fig3_sgd epochs=1,2,4")
    assert "hydra/launcher=joblib" in out[0] and out[1].startswith("+ -m tract_bench.report runs/smoke/fig3_sgd")
