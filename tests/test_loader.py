import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from tract_bench.errors import UserError
from tract_bench.loader import DeviceLoader, rotate

IDENTITY = dict(mean=[0.0] * 3, std=[1 / 255] * 3)  # normalisation that returns raw pixel values


def _random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _coordinate_images(n):
    """Pixel (r, c) holds r+1 in R and c+1 in G (0 is left for padding); B holds the image's id."""
    r, c = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([r + 1, c + 1, torch.zeros_like(r)])
    x = img.repeat(n, 1, 1, 1)
    x[:, 2] = torch.arange(n)[:, None, None] % 256
    return x.to(torch.uint8)


def _batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_each_image_once_per_epoch_and_batch_sizes():
    x, y = _random_images(103), torch.arange(103)
    loader = DeviceLoader(x, y, 10, **IDENTITY, train=True, crop_padding=4, hflip=True, drop_last=False)
    assert len(loader) == 11
    sizes = [len(yb) for _, yb in loader]
    assert sizes == [10] * 10 + [3]
    _, ys = _batches(loader)
    assert sorted(ys.tolist()) == list(range(103))

    dropping = DeviceLoader(x, y, 10, **IDENTITY, train=True)  # train drops the last partial batch by default
    assert len(dropping) == 10 and [len(yb) for _, yb in dropping] == [10] * 10
    assert len(set(_batches(dropping)[1].tolist())) == 100


def test_order_depends_only_on_seed_and_epoch():
    x, y = _random_images(64), torch.arange(64)

    def make(seed):
        return DeviceLoader(x, y, 16, **IDENTITY, train=True, crop_padding=4, hflip=True, rotation=10, seed=seed)

    a, b = make(0), make(0)
    a.set_epoch(3)
    b.set_epoch(3)
    xa, ya = _batches(a)
    xb, yb = _batches(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(_batches(a)[0], xa)  # iterating again replays the epoch (exact resume)
    b.set_epoch(4)
    assert not torch.equal(_batches(b)[1], ya)
    c = make(1)
    c.set_epoch(3)
    assert not torch.equal(_batches(c)[1], ya)


def _recover(xb):
    """Crop offsets and flips from coordinate images, read at the centre pixel (never in the padding)."""
    top = xb[:, 0, 16, 16].long() - 1 - 12
    flip = xb[:, 1, 16, 17] < xb[:, 1, 16, 15]
    left = torch.where(flip, xb[:, 1, 16, 16].long() - 1 - 11, xb[:, 1, 16, 16].long() - 1 - 12)
    return top, left, flip


def test_crop_offsets_uniform_and_flip_half():
    x = _coordinate_images(2048)
    loader = DeviceLoader(x, torch.zeros(2048, dtype=torch.long), 512, **IDENTITY, train=True, crop_padding=4,
                          hflip=True, seed=123)
    counts, flips, total = torch.zeros(9, 9), 0, 0
    for epoch in range(4):
        loader.set_epoch(epoch)
        for xb, _ in loader:
            top, left, flip = _recover(xb)
            assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
            # the whole image is what torchvision's pad + crop + flip gives for these draws
            ids = xb[:, 2, 16, 16].long()
            for i in range(0, len(xb), 37):
                ref = F.pad(x[ids[i]], (4, 4, 4, 4))[:, top[i]:top[i] + 32, left[i]:left[i] + 32]
                assert torch.equal(xb[i], (ref.flip(-1) if flip[i] else ref).float())
            counts += torch.bincount(top * 9 + left, minlength=81).view(9, 9)
            flips += flip.sum().item()
            total += len(xb)
    expected = total / 81
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 140  # 80 degrees of freedom: mean 80, sd 12.6; seeded, so it cannot flake
    assert abs(flips / total - 0.5) < 0.03


def test_rotate_matches_torchvision():
    x = _random_images(8)
    angles = torch.tensor([-30.0, -7.3, 0.0, 5.0, 15.0, 45.0, 90.0, 170.0])
    out = rotate(x.float(), angles)
    for img, a, o in zip(x, angles.tolist(), out):
        ref = TF.rotate(img, a, interpolation=InterpolationMode.NEAREST, fill=0)
        assert (o == ref.float()).float().mean() > 0.99, a


def test_rotation_in_loader():
    x = _random_images(32)
    base = dict(crop_padding=4, hflip=True, seed=5, train=True)
    plain = _batches(DeviceLoader(x, torch.arange(32), 8, **IDENTITY, **base))
    zero = _batches(DeviceLoader(x, torch.arange(32), 8, **IDENTITY, **base, rotation=0.0))
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])

    # each rotated image is one of its images turned by an angle within [-15, 15]
    xs, ys = _batches(DeviceLoader(x, torch.arange(32), 8, **IDENTITY, train=True, rotation=15.0))
    candidates = torch.linspace(-15, 15, 121)  # the true angle is within 0.125 degrees of one of them
    best = []
    for img, i in zip(xs, ys):
        turned = rotate(x[i].float().expand(len(candidates), -1, -1, -1), candidates)
        match = (turned == img).float().mean((1, 2, 3))
        assert match.max() > 0.95  # a wrong angle matches far fewer pixels of a random image
        best.append(candidates[match.argmax()].item())
    assert min(best) < -3 and max(best) > 3


def test_normalisation():
    x, y = _random_images(20), torch.arange(20)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    xs, _ = _batches(DeviceLoader(x, y, 7, mean, std))
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert xs.dtype == torch.float32 and torch.allclose(xs, ref, atol=1e-5)


def test_eval_in_order_unaugmented():
    x, y = _random_images(50), torch.randint(0, 10, (50,))
    loader = DeviceLoader(x, y, 16, **IDENTITY, crop_padding=4, hflip=True, rotation=30)  # train=False: ignored
    assert len(loader) == 4
    loader.set_epoch(7)
    xs, ys = _batches(loader)
    assert torch.equal(xs, x.float()) and torch.equal(ys, y) and ys.dtype == torch.int64


@pytest.mark.parametrize("train", [False, True])
def test_channels_last(train):
    x, y = _random_images(16), torch.arange(16)
    kw = dict(train=train, crop_padding=4, hflip=True, rotation=10.0)
    ref, _ = next(iter(DeviceLoader(x, y, 8, **IDENTITY, **kw)))
    xb, _ = next(iter(DeviceLoader(x, y, 8, **IDENTITY, **kw, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last) and xb.shape == (8, 3, 32, 32)
    assert torch.equal(xb, ref)


def test_bad_arguments():
    x, y = _random_images(10), torch.arange(10)
    with pytest.raises(UserError, match="batch_size=32 exceeds the 10 images"):
        DeviceLoader(x, y, 32, **IDENTITY, train=True)
    assert len(DeviceLoader(x, y, 32, **IDENTITY)) == 1  # eval keeps the partial batch
    with pytest.raises(UserError, match="uint8"):
        DeviceLoader(x.float(), y, 4, **IDENTITY)
    with pytest.raises(UserError, match="one value per channel"):
        DeviceLoader(x, y, 4, mean=[0.5], std=[0.5])
