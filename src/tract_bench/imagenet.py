"""ImageNet and its class subsets from an ImageFolder tree: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG.

`dataset.classes` picks the classes: a preset (conf/classes/<name>.txt, one wnid per line), an int k (the
first k wnids of train/ in sorted order), a list of wnids, or `all`. Labels follow the sorted wnids, as in
torchvision's ImageFolder. Images are decoded in DataLoader workers; the sampler hands each worker
(index, seed) pairs, so the order *and* the augmentation of an epoch are functions of (seed, epoch) alone:
the same for any number of workers, for a resumed run, and (batch_size being the global batch) for K ranks,
which together see exactly the batches one process would.
"""

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import ListConfig
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from tract_bench.config import channels_last, config_dir
from tract_bench.data import balanced_subset
from tract_bench.errors import UserError


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted((Path(config_dir()) / "classes").glob("*.txt"))}


def _class_dirs(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir())


def select_classes(spec, train_dir: Path) -> list[str]:
    """The selected wnids, sorted (label i = i-th wnid); refuses selections train/ cannot serve."""
    present = _class_dirs(train_dir)
    if not present:
        raise UserError(f"{train_dir} holds no class folders; it should hold one folder of images per wnid")
    if spec == "all":
        return present
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 < spec <= len(present):
            raise UserError(f"dataset.classes={spec} but {train_dir} holds {len(present)} class folders; "
                            f"use 1..{len(present)} or all")
        return present[:spec]
    available = presets()
    if isinstance(spec, (list, ListConfig)):
        wnids = [str(w) for w in spec]
    elif isinstance(spec, str) and spec in available:
        wnids = available[spec].read_text().split()
    else:
        raise UserError(f"dataset.classes={spec} is not a preset ({', '.join(available)}), an int, a list of "
                        "wnids or all; pick one of those")
    duplicates = sorted({w for w in wnids if wnids.count(w) > 1})
    if not wnids or duplicates:
        raise UserError(f"dataset.classes={spec} lists no wnids or repeats {duplicates}; list each class once")
    missing = sorted(set(wnids) - set(present))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"dataset.classes={spec}: wnid {missing[0]}{more} has no folder in {train_dir}; "
                        "fix the class list or data.root")
    return sorted(wnids)


def scan(split_dir: Path, wnids: list[str]) -> tuple[list[str], torch.Tensor]:
    """Image paths (class by class, sorted file names) and their labels."""
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = split_dir / wnid
        if not folder.is_dir():
            raise UserError(f"wnid {wnid} has no folder in {split_dir}; every selected class needs train/ and val/")
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise UserError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)}); add them or drop class {wnid}")
        paths += [str(folder / f) for f in files]
        labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64)


class ImageFiles(Dataset):
    """Decodes one image per (index, seed): the seed, when given, fixes the random transform of that draw."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item
        image = pil_loader(self.paths[index])
        if seed is None:
            return self.transform(image), self.labels[index]
        with torch.random.fork_rng(devices=[]):  # with workers=0 this runs in the trainer: leave its RNG alone
            torch.manual_seed(seed)
            return self.transform(image), self.labels[index]


class _Order(Sampler):
    """This rank's (index, seed) pairs for the current epoch; `batch_size` is the global batch."""

    def __init__(self, n, train, batch_size, seed, rank, world_size):
        self.n, self.train, self.batch_size, self.seed = n, train, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __len__(self):
        if self.train:
            return self.n // self.batch_size * (self.batch_size // self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        if not self.train:  # every image exactly once over all ranks, no padding: the counts sum to the full split
            return ((i, None) for i in range(self.rank, self.n, self.world_size))
        # One permutation and one augmentation seed per position, the same on every rank; each global batch is
        # split into contiguous per-rank shares, so K ranks see exactly the batches one process would.
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint64)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(int(state[0])))
        seeds = torch.randint(2**62, (self.n,), generator=torch.Generator().manual_seed(int(state[1])))
        steps, per_rank = self.n // self.batch_size, self.batch_size // self.world_size
        mine = torch.arange(steps * self.batch_size).view(steps, self.world_size, per_rank)[:, self.rank].flatten()
        return zip(perm[mine].tolist(), seeds[mine].tolist())


class FolderLoader:
    """Batches of (normalised float32 images, int64 labels) on `device`, decoded by `workers` processes."""

    def __init__(self, dataset, batch_size, *, device, train, seed, rank, world_size, workers, channels_last):
        self.device = torch.device(device)
        self.order = _Order(len(dataset), train, batch_size, seed, rank, world_size)
        # per rank: a share of the global training batch; evaluation batches only need to fit
        batch_size = batch_size // world_size if train else -(-batch_size // world_size)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # a private generator: the worker seeds it draws would otherwise advance the trainer's global RNG
        self.loader = DataLoader(dataset, batch_size, sampler=self.order, drop_last=train, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 generator=torch.Generator())

    def set_epoch(self, epoch: int):
        self.order.epoch = epoch  # read in this process when an epoch's iteration starts, also by persistent workers

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))


def build_transforms(ds):
    size = ds.image_size
    normalize = [transforms.ToTensor(), transforms.Normalize(list(ds.mean), list(ds.std))]
    train = [transforms.RandomResizedCrop(size, scale=tuple(ds.augment.scale))]
    if ds.augment.hflip:
        train.append(transforms.RandomHorizontalFlip())
    test = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    return transforms.Compose(train + normalize), transforms.Compose(test + normalize)


def build_imagenet_loaders(cfg, device, rank: int = 0, world_size: int = 1):
    """(train loader, test loader, meta) for this rank; cfg.batch_size is the global batch."""
    ds, root = cfg.dataset, Path(cfg.data.root).expanduser()
    if isinstance(ds.image_size, bool) or not isinstance(ds.image_size, int) or ds.image_size < 1:
        raise UserError(f"dataset.image_size={ds.image_size} must be a positive integer, e.g. 224")
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by the {world_size} processes; "
                        f"use a multiple of {world_size}")
    if not root.is_dir():
        raise UserError(f"data.root={root} does not exist; set TRACT_DATA or data.root to the folder holding "
                        "ImageNet's train/ and val/")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"no {split}/ folder in {root}; set TRACT_DATA or data.root to the folder holding "
                            "ImageNet's train/<wnid>/ and val/<wnid>/")
    wnids = select_classes(ds.classes, root / "train")
    splits = {}
    for split, subset in (("train", cfg.data.train_subset), ("val", cfg.data.test_subset)):
        paths, labels = scan(root / split, wnids)
        if subset:
            keep, labels = balanced_subset(torch.arange(len(paths)), labels, subset, len(wnids))
            paths = [paths[i] for i in keep.tolist()]
        splits[split] = paths, labels.tolist()

    train_tf, test_tf = build_transforms(ds)
    common = dict(device=device, seed=cfg.seed, rank=rank, world_size=world_size, workers=cfg.data.workers,
                  channels_last=channels_last(cfg, device))
    train = FolderLoader(ImageFiles(*splits["train"], train_tf), cfg.batch_size, train=True, **common)
    if len(train) == 0:
        raise UserError(f"batch_size={cfg.batch_size} exceeds the {len(splits['train'][0])} training images; "
                        "lower it")
    test = FolderLoader(ImageFiles(*splits["val"], test_tf), cfg.data.eval_batch_size, train=False, **common)
    meta = {"num_classes": len(wnids), "classes": wnids, "source": str(root),
            "train_images": len(splits["train"][0]), "test_images": len(splits["val"][0])}
    return train, test, meta
