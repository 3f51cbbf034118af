import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import CIFAR10_CLASSES, dump_py2, make_archive, real_cifar_root

from tract_bench import data
from tract_bench.data import balanced_subset, load_cifar
from tract_bench.errors import UserError


def _listing(root):
    return sorted((p, os.stat(os.path.join(d, p)).st_mtime_ns) for d, dirs, files in os.walk(root)
                  for p in dirs + files)


def _plain_load(path):  # fine in tests: these are files the tests wrote themselves
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_loads_tiny_cifar10_folder(tiny_cifar10_root):
    before = _listing(tiny_cifar10_root)
    d = load_cifar("cifar10", tiny_cifar10_root, download=False)
    assert d.train_x.shape == (200, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (100, 3, 32, 32) and d.train_y.dtype == d.test_y.dtype == torch.int64
    assert d.classes == CIFAR10_CLASSES and d.num_classes == 10
    assert d.source == str(tiny_cifar10_root / "cifar-10-batches-py")
    assert torch.bincount(d.train_y).tolist() == [20] * 10
    # pixel layout: row = 1024 R, 1024 G, 1024 B values, each plane row-major
    b1 = _plain_load(tiny_cifar10_root / "cifar-10-batches-py" / "data_batch_1")
    assert np.array_equal(d.train_x[: len(b1["labels"])].reshape(-1, 3072).numpy(), b1["data"])
    assert d.train_y[: len(b1["labels"])].tolist() == b1["labels"]
    assert _listing(tiny_cifar10_root) == before  # nothing written into the data root


def test_loads_tiny_cifar100_fine_labels(tiny_cifar100_root):
    d = load_cifar("cifar100", tiny_cifar100_root, download=False)
    assert d.train_x.shape == (500, 3, 32, 32) and d.test_x.shape == (200, 3, 32, 32)
    assert d.num_classes == 100 and d.classes[0] == "class_000"
    train = _plain_load(tiny_cifar100_root / "cifar-100-python" / "train")
    assert d.train_y.tolist() == train["fine_labels"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz"])
def test_archive_extracts_into_cache_once(tiny_cifar10_root, tmp_path, monkeypatch, suffix):
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    archive = make_archive(tiny_cifar10_root / "cifar-10-batches-py", root, suffix)
    root.chmod(0o555)  # read-only root: extraction must go to the cache (root ignores this, hence the listing)
    before = _listing(root)
    ref = load_cifar("cifar10", tiny_cifar10_root, download=False)
    d = load_cifar("cifar10", root, download=False, cache_dir=cache)
    assert torch.equal(d.train_x, ref.train_x) and torch.equal(d.test_y, ref.test_y)
    assert d.source.startswith(str(cache)) and d.source.endswith("cifar-10-batches-py")
    assert _listing(root) == before
    st = archive.stat()
    assert [p.name for p in cache.iterdir()] == [f"{archive.name}-{st.st_size}-{st.st_mtime_ns}"]

    # a second load reuses the extracted folder
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("re-extracted"))
    assert load_cifar("cifar10", root, download=False, cache_dir=cache).source == d.source
    monkeypatch.undo()

    # a changed archive (new mtime) is extracted afresh
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert load_cifar("cifar10", root, download=False, cache_dir=cache).source != d.source
    assert len(list(cache.iterdir())) == 2
    root.chmod(0o755)


def test_default_cache_dir_from_env(tiny_cifar100_root, tmp_path, monkeypatch):
    make_archive(tiny_cifar100_root / "cifar-100-python", tmp_path, ".tar.gz")
    monkeypatch.setenv("TRACT_CACHE", str(tmp_path / "envcache"))
    d = load_cifar("cifar100", tmp_path, download=False)
    assert d.source.startswith(str(tmp_path / "envcache")) and len(d.train_y) == 500
    monkeypatch.delenv("TRACT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "tract_bench"


def test_broken_archive_leaves_no_trusted_folder(tiny_cifar10_root, tmp_path):
    archive = make_archive(tiny_cifar10_root / "cifar-10-batches-py", tmp_path, ".tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # interrupted download
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="could not unpack"):
        load_cifar("cifar10", tmp_path, download=False, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a final folder nor a leftover partial one


def test_archive_without_the_folder_is_refused(tmp_path):
    (tmp_path / "junk").write_text("x")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "junk", arcname="junk")
    with pytest.raises(UserError, match="no cifar-10-batches-py/ folder"):
        load_cifar("cifar10", tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_missing_dataset_message(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for part in ("cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar-10-python.tar.xz", "TRACT_DATA=",
                 "data.root=", "data.download=true"):
        assert part in msg


def test_failed_download_message(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3]\n Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as e:
        load_cifar("cifar100", tmp_path / "new", download=True)
    msg = str(e.value)
    assert "\n" not in msg and "could not download cifar100" in msg and "name resolution" in msg
    assert "TRACT_DATA=/dir/holding/cifar-100-python" in msg
    assert os.listdir(tmp_path / "new") == []  # the failed download left nothing behind


def test_download_lands_atomically(tmp_path, monkeypatch, tiny_cifar10_root):
    """The download is unpacked privately and renamed into place; a copy that lost the race is discarded."""
    import torchvision

    def fake_download(url, root, filename, md5):
        shutil.copytree(os.path.join(tiny_cifar10_root, "cifar-10-batches-py"),
                        os.path.join(root, "cifar-10-batches-py"))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    assert len(load_cifar("cifar10", tmp_path, download=True).train_y) == 200
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-batches-py"]
    data._download("cifar10", data._SPECS["cifar10"], tmp_path, fix="")  # another job finishing second
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-batches-py"]


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError, match="'mnist'.*cifar10, cifar100"):
        load_cifar("mnist", tmp_path)


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _copy(src_root, dst_root):
    shutil.copytree(src_root / "cifar-10-batches-py", dst_root / "cifar-10-batches-py")
    return dst_root / "cifar-10-batches-py"


def test_unpickler_refuses_code(tiny_cifar10_root, tmp_path):
    folder = _copy(tiny_cifar10_root, tmp_path)
    marker = tmp_path / "pwned"
    batch = _plain_load(folder / "data_batch_2")
    batch["labels"] = _Evil(f"touch {marker}")
    dump_py2(batch, folder / "data_batch_2")
    with pytest.raises(UserError, match=r"data_batch_2.*refusing.*(posix|os)\.system"):
        load_cifar("cifar10", tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(data=b["data"][:, :3000]), r"shape \(N, 3072\)"),
    (lambda b: b.update(data=b["data"].astype(np.float32)), "uint8"),
    (lambda b: b.update(labels=b["labels"][:-1]), "must be 40 integers"),
    (lambda b: b.update(labels=[10] + b["labels"][1:]), r"labels must lie in \[0, 10\)"),
    (lambda b: b.update(labels=[-1] + b["labels"][1:]), r"labels must lie in \[0, 10\)"),
    (lambda b: b.update(labels=[0.5] * len(b["labels"])), "integers"),
    (lambda b: b.pop("data"), "no 'data' entry"),
])
def test_bad_batches_refused(tiny_cifar10_root, tmp_path, change, message):
    folder = _copy(tiny_cifar10_root, tmp_path)
    batch = _plain_load(folder / "data_batch_3")
    change(batch)
    dump_py2(batch, folder / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3: .*" + message):
        load_cifar("cifar10", tmp_path, download=False)


def test_bad_meta_and_garbage_refused(tiny_cifar10_root, tmp_path):
    folder = _copy(tiny_cifar10_root, tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="test_batch: not a readable CIFAR pickle"):
        load_cifar("cifar10", tmp_path, download=False)
    dump_py2({"label_names": ["a", "b"]}, folder / "batches.meta")
    with pytest.raises(UserError, match="batches.meta: 'label_names' must be a list of 10"):
        load_cifar("cifar10", tmp_path, download=False)
    (folder / "batches.meta").unlink()
    with pytest.raises(UserError, match="batches.meta: file missing"):
        load_cifar("cifar10", tmp_path, download=False)


def test_balanced_subset():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (500,), generator=g)
    x = torch.arange(500)  # images stand-in: their storage index
    xs, ys = balanced_subset(x, y, 25, 10)
    assert torch.bincount(ys, minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.equal(ys, y[xs]) and (xs.diff() > 0).all()  # storage order
    expected = sorted(i for c in range(10) for i in (y == c).nonzero().flatten()[: 3 if c < 5 else 2].tolist())
    assert xs.tolist() == expected
    xs2, _ = balanced_subset(x, y, 25, 10)
    assert torch.equal(xs, xs2)
    assert len(balanced_subset(x, y, 10, 10)[0]) == 10


def test_balanced_subset_bad_sizes():
    y = torch.arange(100) % 10
    with pytest.raises(UserError, match="smaller than the 10 classes"):
        balanced_subset(y, y, 5, 10)
    with pytest.raises(UserError, match="exceeds the 100 available"):
        balanced_subset(y, y, 101, 10)
    with pytest.raises(UserError, match="class 3"):
        balanced_subset(y[y != 3], y[y != 3], 90, 10)  # enough images overall, but class 3 has none


def test_real_cifar10():
    d = load_cifar("cifar10", real_cifar_root("cifar10"), download=False)
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert d.classes == CIFAR10_CLASSES
    assert torch.bincount(d.train_y).tolist() == [5000] * 10
    mean = d.train_x.sum((0, 2, 3), dtype=torch.int64).double() / (255 * 50000 * 32 * 32)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.double), atol=1e-3)


def test_real_cifar100():
    d = load_cifar("cifar100", real_cifar_root("cifar100"), download=False)
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert len(d.classes) == 100 and d.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert torch.bincount(d.test_y).tolist() == [100] * 100
    mean = d.train_x.sum((0, 2, 3), dtype=torch.int64).double() / (255 * 50000 * 32 * 32)
    assert torch.allclose(mean, torch.tensor([0.5071, 0.4865, 0.4409], dtype=torch.double), atol=1e-3)
