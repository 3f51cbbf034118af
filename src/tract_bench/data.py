"""CIFAR-10/100 from the original "python version" files (a folder, or its archive) into uint8 tensors.

The batch files are pickles, so they are read with an unpickler that can only rebuild numpy arrays: a
tampered file cannot run code. Archives are unpacked once into a cache, so the data root may be read-only.
"""

import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tract_bench.errors import UserError

try:  # numpy >= 1.26 has numpy._core; the original files name numpy.core, which numpy 2 only keeps as a shim
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct


@dataclass(frozen=True)
class _Spec:
    folder: str  # the folder inside the archive
    archive: str  # archive name without .tar.gz / .tar.xz
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int


_SPECS = {
    "cifar10": _Spec("cifar-10-batches-py", "cifar-10-python", tuple(f"data_batch_{i}" for i in range(1, 6)),
                     ("test_batch",), "batches.meta", "labels", "label_names", 10),
    "cifar100": _Spec("cifar-100-python", "cifar-100-python", ("train",), ("test",), "meta",
                      "fine_labels", "fine_label_names", 100),
}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.xz")


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8 (N, 3, H, W), CPU
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]  # class names from the meta file
    source: str  # the directory the batches were read from (recorded in run folders)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits exactly the globals that pickled numpy arrays need (checked against the real CIFAR files)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # Python-2 str -> str, like torchvision reads them
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"{self.path}: refusing to unpickle global {module}.{name}; "
                            "a CIFAR batch holds only numpy arrays and lists, so this file is not one")
        return self.ALLOWED[module, name]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: file missing; the dataset folder is incomplete, delete it and unpack again") from None
    except Exception as e:  # any corruption surfaces as one of many exception types
        raise UserError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batches(folder: Path, files, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        path = folder / name
        d = _unpickle(path)
        for key in ("data", spec.label_key):
            if key not in d:
                raise UserError(f"{path}: no '{key}' entry (has {sorted(d)})")
        x, y = d["data"], np.asarray(d[spec.label_key])
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
        if y.ndim != 1 or len(y) != len(x) or (y.size and y.dtype.kind not in "iu"):
            raise UserError(f"{path}: '{spec.label_key}' must be {len(x)} integers, got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise UserError(f"{path}: labels must lie in [0, {spec.num_classes}), found {y.min()}..{y.max()}")
        xs.append(x)
        ys.append(y.astype(np.int64))
    # rows are 1024 R, 1024 G, 1024 B values, each plane row-major: exactly (3, 32, 32) per image
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))
    return x, torch.from_numpy(np.concatenate(ys))


def _read_folder(folder: Path, spec: _Spec) -> ImageData:
    meta_path = folder / spec.meta
    names = _unpickle(meta_path).get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes or not all(isinstance(n, str) for n in names):
        raise UserError(f"{meta_path}: '{spec.names_key}' must be a list of {spec.num_classes} class names")
    train_x, train_y = _read_batches(folder, spec.train, spec)
    test_x, test_y = _read_batches(folder, spec.test, spec)
    return ImageData(train_x, train_y, test_x, test_y, names, str(folder))


def default_cache_dir() -> Path:
    if os.environ.get("TRACT_CACHE"):
        return Path(os.environ["TRACT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "tract_bench"


def _extract_cached(archive: Path, spec: _Spec, cache_dir: Path) -> Path:
    """Unpack `archive` once; the key changes with the archive's size and mtime, so a replaced archive re-extracts."""
    st = archive.stat()
    final = cache_dir / f"{archive.name}-{st.st_size}-{st.st_mtime_ns}"
    if (final / spec.folder).is_dir():
        return final / spec.folder
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    except OSError as e:
        raise UserError(f"cannot write the cache {cache_dir} to unpack {archive} ({e}); "
                        "set TRACT_CACHE to a writable directory") from None
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, '..', devices and links leaving tmp
        if not (tmp / spec.folder).is_dir():
            raise UserError(f"{archive}: has no {spec.folder}/ folder inside; is it the right archive?")
        # a folder that is only renamed into place once complete: an interrupted run leaves just a .partial-* dir
        try:
            tmp.rename(final)
        except OSError:
            if not (final / spec.folder).is_dir():  # not a concurrent run that finished first
                raise
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{archive}: could not unpack ({type(e).__name__}: {e}); replace the archive") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / spec.folder


def _download(name: str, spec: _Spec, root: Path, fix: str) -> None:
    import torchvision  # slow import, only needed here

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    # only fetch and unpack (md5-checked) through torchvision: constructing the dataset would unpickle the
    # batches with plain pickle, which we never do
    # Into a private temporary folder, then renamed into place: parallel jobs or ranks that download at once
    # never read each other's half-written files; the first to finish wins and the others discard their copy.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        torchvision.datasets.utils.download_and_extract_archive(cls.url, str(tmp), filename=cls.filename,
                                                                md5=cls.tgz_md5)
        if not (root / spec.folder).exists():
            os.replace(tmp / spec.folder, root / spec.folder)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise UserError(f"could not download {name} into {root} ({type(e).__name__}: {msg}); {fix}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar(name: str, root: str | os.PathLike, download: bool = True,
               cache_dir: str | os.PathLike | None = None) -> ImageData:
    """Load CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100", fine labels) from `root`.

    `root` holds the dataset folder (cifar-10-batches-py/ or cifar-100-python/) or its .tar.gz/.tar.xz
    archive; archives are unpacked into `cache_dir` (default: default_cache_dir()). With `download`, a
    missing dataset is fetched into `root` by torchvision.
    """
    if name not in _SPECS:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(_SPECS)}")
    spec, root = _SPECS[name], Path(root).expanduser()
    if (root / spec.folder).is_dir():
        return _read_folder(root / spec.folder, spec)
    for suffix in _ARCHIVE_SUFFIXES:
        archive = root / (spec.archive + suffix)
        if archive.is_file():
            cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            return _read_folder(_extract_cached(archive, spec, cache), spec)
    fix = f"set TRACT_DATA=/dir/holding/{spec.folder} (or its archive) or pass data.root=..."
    if not download:
        archives = " or ".join(spec.archive + s for s in _ARCHIVE_SUFFIXES)
        raise UserError(f"{name} not found: no {spec.folder}/ and no {archives} in {root}; "
                        f"{fix}, or data.download=true to fetch it")
    _download(name, spec, root, fix)
    return _read_folder(root / spec.folder, spec)


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n // C images of each class in storage order (one more for the lowest n % C classes).

    Deterministic, so a subset run uses the same images every time; the result keeps storage order.
    """
    if n < num_classes:
        raise UserError(f"subset size {n} is smaller than the {num_classes} classes; use at least {num_classes}")
    if n > len(y):
        raise UserError(f"subset size {n} exceeds the {len(y)} available images; use at most {len(y)}")
    quota = torch.full((num_classes,), n // num_classes, dtype=torch.long)
    quota[: n % num_classes] += 1
    counts = torch.bincount(y, minlength=num_classes)
    short = (counts < quota).nonzero().flatten()
    if len(short):
        c = short[0].item()
        raise UserError(f"subset size {n} needs {quota[c].item()} images of class {c} but there are only "
                        f"{counts[c].item()}; use a smaller subset")
    # rank of each image within its class, via a stable sort by label
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - starts[y[order]]
    keep = rank < quota[y]
    return x[keep], y[keep]
