"""Shared fixtures: tiny CIFAR-format datasets written in the original "python version" layout.

Other test files reuse these: `from conftest import write_cifar, dump_py2, real_cifar_root`.
"""

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LAYOUT = {"cifar10": ("cifar-10-batches-py", "cifar-10-python"), "cifar100": ("cifar-100-python", "cifar-100-python")}


class _Py2Pickler(pickle.Pickler):
    """Pickles arrays as Python 2 did: bytes as str (read back with encoding="latin1").

    Python 3 protocol 2 would store bytes via _codecs.encode, a global the real files never contain
    (and the loader refuses).
    """

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            ctor, (cls, empty_shape, typecode), (version, shape, dtype, fortran, raw) = obj.__reduce__()
            args = (cls, empty_shape, typecode.decode("latin1"))
            return ctor, args, (version, shape, dtype, fortran, raw.decode("latin1"))
        return NotImplemented


def dump_py2(obj, path):
    """Write `obj` the way the original CIFAR batches are written (protocol 2, no _codecs)."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def make_images(labels, seed, size=32):
    """Learnable uint8 images (N, 3, size, size): a class colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    cls_rng = np.random.default_rng(1234)  # the same class look for every seed, so train and test agree
    colour = cls_rng.uniform(40, 215, (k, 3))
    angle = cls_rng.uniform(0, np.pi, k)
    freq = cls_rng.uniform(0.2, 0.8, k)
    r, c = np.mgrid[:size, :size]
    phase = (np.cos(angle)[:, None, None] * r + np.sin(angle)[:, None, None] * c) * freq[:, None, None]
    stripes = 35 * np.sin(phase)  # (k, size, size)
    img = colour[labels][:, :, None, None] + stripes[labels][:, None] + rng.normal(0, 25, (len(labels), 3, size, size))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _split(n_per_class, num_classes, rng):
    """Labels with n_per_class of each class, shuffled so storage order is not sorted by class."""
    return rng.permutation(np.repeat(np.arange(num_classes), n_per_class))


def write_cifar(root, name, n_train_per_class, n_test_per_class, seed=0):
    """Write a tiny dataset in the exact layout of `name` ("cifar10"/"cifar100") under `root`; returns its folder."""
    folder = Path(root) / LAYOUT[name][0]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    y_train, y_test = _split(n_train_per_class, k, rng), _split(n_test_per_class, k, rng)
    # stored as rows of 1024 R, then 1024 G, then 1024 B values
    x_train = make_images(y_train, seed + 1).reshape(len(y_train), -1)
    x_test = make_images(y_test, seed + 2).reshape(len(y_test), -1)
    if name == "cifar10":
        for i, idx in enumerate(np.array_split(np.arange(len(y_train)), 5), 1):
            dump_py2({"batch_label": f"training batch {i} of 5", "labels": y_train[idx].tolist(),
                      "data": x_train[idx], "filenames": [f"train_{j:05d}.png" for j in idx]},
                     folder / f"data_batch_{i}")
        dump_py2({"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(), "data": x_test,
                  "filenames": [f"test_{j:05d}.png" for j in range(len(y_test))]}, folder / "test_batch")
        dump_py2({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": len(y_train) // 5, "num_vis": 3072},
                 folder / "batches.meta")
    else:
        for split, y, x in (("train", y_train, x_train), ("test", y_test, x_test)):
            dump_py2({"batch_label": f"{split}ing batch 1 of 1", "fine_labels": y.tolist(),
                      "coarse_labels": (y // 5).tolist(), "data": x,
                      "filenames": [f"{split}_{j:05d}.png" for j in range(len(y))]}, folder / split)
        dump_py2({"fine_label_names": [f"class_{i:03d}" for i in range(100)],
                  "coarse_label_names": [f"super_{i:02d}" for i in range(20)]}, folder / "meta")
    return folder


def make_archive(folder, dest_dir, suffix=".tar.gz"):
    """Pack a dataset folder into dest_dir/<official archive name><suffix> ('.tar.gz' or '.tar.xz')."""
    name = next(n for n, (f, _) in LAYOUT.items() if f == Path(folder).name)
    path = Path(dest_dir) / (LAYOUT[name][1] + suffix)
    with tarfile.open(path, "w:gz" if suffix == ".tar.gz" else "w:xz") as tar:
        tar.add(folder, arcname=Path(folder).name)
    return path


def real_cifar_root(name):
    """$TRACT_DATA when it holds the real `name` dataset (folder or archive); skips the test otherwise."""
    root = os.environ.get("TRACT_DATA")
    folder, archive = LAYOUT[name]
    if root and ((Path(root) / folder).is_dir()
                 or any((Path(root) / (archive + s)).is_file() for s in (".tar.gz", ".tar.xz"))):
        return root
    pytest.skip(f"real {name} not available: set TRACT_DATA to a directory holding {folder}/ or its archive")


@pytest.fixture(scope="session")
def tiny_cifar10_root(tmp_path_factory):
    """A root holding cifar-10-batches-py/ with 10 classes x 20 train and x 10 test images (read-only: don't write)."""
    root = tmp_path_factory.mktemp("tiny_cifar10")
    write_cifar(root, "cifar10", 20, 10, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_cifar100_root(tmp_path_factory):
    """A root holding cifar-100-python/ with 100 classes x 5 train and x 2 test images (read-only: don't write)."""
    root = tmp_path_factory.mktemp("tiny_cifar100")
    write_cifar(root, "cifar100", 5, 2, seed=0)
    return root
