"""ImageNet subsets: class selection, the errors on bad trees, the loaders (values, sharding, subsets), one run."""

import json
import re
import shutil
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from tract_bench.config import config_dir, register_resolvers
from tract_bench.errors import UserError
from tract_bench.imagenet import build_imagenet_loaders, presets, select_classes

IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
              "n03425413", "n03445777", "n03888257"]
GREY = "n00000001"  # a class of uniform grey (200) images: its normalised values are known
WNIDS = [GREY] + IMAGENETTE
N_TRAIN, N_VAL = 4, 2


def write_tree(root, wnids, n_train=N_TRAIN, n_val=N_VAL):
    """train/<wnid>/ and val/<wnid>/ of small non-square JPEGs, plus a stray non-image file the loader must skip."""
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        x = make_images(np.repeat(np.arange(len(wnids)), n), seed, size=48)[:, :, :40]  # (N, 3, 40, 48)
        for c, wnid in enumerate(wnids):
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((40, 48, 3), 200, np.uint8) if wnid == GREY else x[c * n + i].transpose(1, 2, 0)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
            (folder / "notes.txt").write_text("not an image")
    return Path(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """11 classes (a grey one + Imagenette's wnids) x 4 train / 2 val images (read-only: don't write)."""
    return write_tree(tmp_path_factory.mktemp("imagenet"), WNIDS)


def compose(*overrides):
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra.compose("train", overrides=["dataset=imagenet_subset", "dataset.image_size=32", "data.workers=0",
                                                 "device=cpu", "progress=false", *overrides])


def loaders(root, *overrides, rank=0, world_size=1):
    return build_imagenet_loaders(compose(f"data.root={root}", *overrides), torch.device("cpu"), rank, world_size)


def test_presets_are_the_published_lists():
    lists = {name: path.read_text().split() for name, path in presets().items()}
    assert set(lists) >= {"imagenet100", "imagenette"}
    assert lists["imagenette"] == IMAGENETTE
    assert len(set(lists["imagenet100"])) == 100 and lists["imagenet100"][:3] == ["n02869837", "n01749939", "n02488291"]
    assert all(re.fullmatch(r"n\d{8}", w) for wnids in lists.values() for w in wnids)


@pytest.mark.parametrize("spec, expected", [
    ("imagenette", IMAGENETTE), ("all", WNIDS), (3, WNIDS[:3]), (1, [GREY]),
    (["n03888257", "n01440764"], ["n01440764", "n03888257"]),  # labels follow the sorted wnids
])
def test_class_selection(tree, spec, expected):
    assert select_classes(spec, tree / "train") == expected


@pytest.mark.parametrize("spec, message", [
    ("imagenet100", "wnid n01558993 (and 99 more) has no folder"),  # its lowest wnid; none present
    ("imagenet1k", "not a preset (imagenet100, imagenette)"),
    (12, "holds 11 class folders; use 1..11 or all"), (0, "use 1..11"),
    (["n01440764", "n01440764"], "repeats ['n01440764']"), (["n09999999"], "wnid n09999999 has no folder"),
])
def test_bad_class_selection(tree, spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        select_classes(spec, tree / "train")


def test_bad_trees(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        loaders(tmp_path / "nowhere", "dataset.classes=all")
    root = write_tree(tmp_path / "t", ["n00000001", "n00000002"], 2, 1)
    shutil.rmtree(root / "val" / "n00000002")
    with pytest.raises(UserError, match=f"wnid n00000002 has no folder in {root / 'val'}"):
        loaders(root, "dataset.classes=all")
    shutil.rmtree(root / "val")
    with pytest.raises(UserError, match="no val/ folder"):
        loaders(root, "dataset.classes=all")
    (root / "val" / "n00000001").mkdir(parents=True)  # a class folder with no images
    with pytest.raises(UserError, match=re.escape(f"{root / 'val' / 'n00000001'} holds no images")):
        loaders(root, "dataset.classes=1")


def test_loader_values(tree):
    train, test, meta = loaders(tree, "dataset.classes=all", "batch_size=4", "data.eval_batch_size=5")
    assert meta == {"num_classes": 11, "classes": WNIDS, "source": str(tree), "train_images": 44, "test_images": 22}
    assert len(train) == 11 and len(test) == 5
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = zip(*test)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (22, 3, 32, 32) and y.tolist() == np.repeat(np.arange(11), N_VAL).tolist()  # storage order
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    grey = (200 / 255 - mean) / std
    torch.testing.assert_close(x[y == 0].mean((0, 2, 3)), grey, atol=0.02, rtol=0)  # ImageNet mean/std applied
    train.set_epoch(1)
    labels = torch.cat([y for _, y in train])
    assert torch.bincount(labels).tolist() == [N_TRAIN] * 11  # 44 = 11 x 4: an epoch shows every image once


def epoch(loader, e):
    loader.set_epoch(e)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_epochs_depend_on_seed_and_epoch_only(tree):
    a, _, _ = loaders(tree, "dataset.classes=imagenette", "batch_size=8")
    b, _, _ = loaders(tree, "dataset.classes=imagenette", "batch_size=8", "data.workers=2")
    rng = torch.get_rng_state()
    x1, y1 = epoch(a, 1)
    assert torch.equal(torch.get_rng_state(), rng)  # the trainer's RNG stream is untouched
    x2, y2 = epoch(b, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # same order and augmentation with 2 workers
    x3, _ = epoch(a, 2)
    assert not torch.equal(x1, x3)
    assert torch.equal(epoch(b, 2)[0], x3)  # the persistent workers follow set_epoch


def test_sharding(tree):
    ranks = [loaders(tree, "dataset.classes=all", "batch_size=4", "data.eval_batch_size=4", rank=r, world_size=2)
             for r in range(2)]
    # test: every image exactly once over the ranks, no padding
    tests = [epoch(test, 0)[1] for _, test, _ in ranks]
    assert sum(len(y) for y in tests) == 22
    assert torch.bincount(torch.cat(tests)).tolist() == [N_VAL] * 11
    orders = [[i for i, _ in test.order] for _, test, _ in ranks]
    assert sorted(orders[0] + orders[1]) == list(range(22))
    # train: each global batch of 4 split into disjoint halves, exactly the batches (and augmentation) of one process
    single, _, _ = loaders(tree, "dataset.classes=all", "batch_size=4")
    for loader in (single, *(train for train, _, _ in ranks)):
        loader.set_epoch(3)
    assert len(single) == len(ranks[0][0]) == len(ranks[1][0]) == 11
    shares = [list(train.order) for train, _, _ in ranks]
    assert [x for i in range(11) for share in shares for x in share[2 * i:2 * i + 2]] == list(single.order)
    assert not {i for i, _ in shares[0]} & {i for i, _ in shares[1]}
    x0, _ = next(iter(ranks[0][0]))
    x, _ = next(iter(single))
    assert x0.shape[0] == 2 and torch.equal(x0, x[:2])
    with pytest.raises(UserError, match="batch_size=5 is not divisible by the 2 processes"):
        loaders(tree, "batch_size=5", rank=0, world_size=2)


def test_balanced_subsets(tree):
    train, test, meta = loaders(tree, "dataset.classes=4", "data.train_subset=8", "data.test_subset=5",
                                "batch_size=2")
    assert meta["train_images"] == 8 and meta["test_images"] == 5
    names = [Path(p).name for p in train.loader.dataset.paths]
    assert names == [f"{w}_{i}.JPEG" for w in WNIDS[:4] for i in range(2)]  # the first n/C files, sorted
    assert test.loader.dataset.labels == [0, 0, 1, 2, 3]  # 5 = 2 + 1 + 1 + 1
    with pytest.raises(UserError, match="subset size 20 exceeds the 16"):
        loaders(tree, "dataset.classes=4", "data.train_subset=20")


def test_experiment_config():
    cfg = compose("experiment=imagenet_r50", "epochs=90")
    assert (cfg.model.arch, cfg.model.name, cfg.dataset.classes, cfg.batch_size) == ("timm", "resnet50", "all", 256)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.gamma) == (0.1, 1e-4, 0.9, 0.1)
    assert compose("experiment=imagenet_r50").optim.lr == 0.141


def test_one_epoch_run(tree, tmp_path):
    from tract_bench.train import run

    cfg = compose(f"data.root={tree}", "dataset.classes=all", "model=resnet18", "epochs=1", "batch_size=8",
                  "data.eval_batch_size=16", "optim.lr=0.01", "tract.lam=0.1", "data.workers=2", f"out_dir={tmp_path}")
    folder = run(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["tract"]["n"] == 27
    assert summary["data"]["train_images"] == 44 and summary["data"]["test_images"] == 22
