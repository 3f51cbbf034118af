"""A loader that keeps the whole uint8 dataset on the device and augments whole batches at once.

CIFAR fits in device memory many times over, so there are no workers and no per-image Python: a batch is
one index_select, one gather (crop + flip), an optional grid_sample (rotation) and one fused normalisation.
An epoch's order and augmentation depend only on (seed, epoch), so a resumed run sees the same batches.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from tract_bench.errors import UserError


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor | None,
              padding: int) -> torch.Tensor:
    """Zero-pad by `padding`, take the (H, W) window at (top, left) of each image, mirror where `flip`.

    Same result as torchvision's RandomCrop(padding=p) + RandomHorizontalFlip with those draws;
    x: (B, C, H, W) of any dtype, top/left: (B,) ints in [0, 2p], flip: (B,) bools.
    """
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
    wp = w + 2 * padding
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    # one flat gather per image: the index of output pixel (r, c) in the padded plane, shared by all channels
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (positive = counter-clockwise, as torchvision).

    Nearest interpolation with zero fill; x: float (B, C, H, W), degrees: (B,).
    """
    _, _, h, w = x.shape
    a = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    # theta maps output to input in normalised coordinates; with y pointing down, sampling at R(+a)
    # turns the picture counter-clockwise. h/w and w/h undo the per-axis normalisation on non-square images.
    theta = torch.stack([torch.stack([cos, -sin * (h / w), zero], 1),
                         torch.stack([sin * (w / h), cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class DeviceLoader:
    """Batches of (normalised float32 images, int64 labels) on `device`, from uint8 x (N, C, H, W) and y (N,).

    train=True: a fresh permutation and augmentation per epoch (call set_epoch), drop_last by default.
    train=False: storage order, no augmentation, the last partial batch kept by default.
    Under DDP (world_size > 1) `batch_size` is the global batch: every rank draws the same permutation and
    augmentation for it and keeps its own contiguous share, so K ranks see exactly the batches one process
    would; for evaluation each rank keeps images rank::world_size, so summed counts cover the split once.
    """

    def __init__(self, x, y, batch_size, mean, std, *, device="cpu", train=False, crop_padding=0, hflip=False,
                 rotation=0.0, seed=0, drop_last=None, channels_last=False, rank=0, world_size=1):
        if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (len(x),):
            raise UserError(f"DeviceLoader needs uint8 images (N, C, H, W) and N labels, "
                            f"got {x.dtype} {tuple(x.shape)} and {tuple(y.shape)}")
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1")
        if crop_padding < 0 or rotation < 0 or seed < 0:
            raise UserError(f"crop_padding={crop_padding}, rotation={rotation} and seed={seed} must be >= 0")
        if batch_size % world_size:
            raise UserError(f"batch_size={batch_size} is not divisible by the {world_size} processes; "
                            "pick a multiple of the world size")
        if not train:
            x, y = x[rank::world_size], y[rank::world_size]
            batch_size = -(-batch_size // world_size)
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train = train
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(x) < batch_size:
            raise UserError(f"batch_size={batch_size} exceeds the {len(x)} images, so an epoch would have "
                            "no batches; use a smaller batch size")
        self.crop_padding, self.hflip, self.rotation = crop_padding, hflip, float(rotation)
        self.seed, self.epoch = seed, 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # (x/255 - mean)/std as one multiply-add
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (x.shape[1],) or std.shape != (x.shape[1],) or (std <= 0).any():
            raise UserError(f"mean={mean.tolist()} and std={std.tolist()} need one value per channel "
                            f"({x.shape[1]}), std > 0")
        self.scale = (1 / (255 * std)).view(1, -1, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(self.device)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generators(self):
        # SeedSequence mixes (seed, epoch) into unrelated streams: the order on the CPU (randperm there is
        # cheap and identical on every machine), the augmentation on the device, next to the data
        order_seed, aug_seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint64)
        order = torch.Generator().manual_seed(int(order_seed))
        aug = torch.Generator(device=self.device).manual_seed(int(aug_seed))
        return order, aug

    def _augment(self, xb, gen, b, share):
        """Augment this rank's images `xb`, drawing the random parameters for the whole global batch of `b`."""
        p = self.crop_padding
        if p or self.hflip:
            top, left = torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=self.device)[:, share]
            flip = (torch.rand(b, generator=gen, device=self.device) < 0.5)[share] if self.hflip else None
            xb = crop_flip(xb, top, left, flip, p)
        xb = xb.contiguous(memory_format=self.memory_format).float()  # relayout while still uint8: 4x fewer bytes
        if self.rotation:
            deg = (torch.rand(b, generator=gen, device=self.device) * 2 - 1)[share] * self.rotation
            xb = rotate(xb, deg)
        return xb

    def __iter__(self):
        n, bs = len(self.x), self.batch_size
        if self.train:
            order_gen, aug_gen = self._generators()
            perm = torch.randperm(n, generator=order_gen).to(self.device)
            per_rank = bs // self.world_size
            share = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for i in range(len(self)):
            if self.train:
                batch = perm[i * bs:(i + 1) * bs]
                idx = batch[share]
                xb, yb = self._augment(self.x[idx], aug_gen, len(batch), share), self.y[idx]
            else:
                xb = self.x[i * bs:(i + 1) * bs].contiguous(memory_format=self.memory_format).float()
                yb = self.y[i * bs:(i + 1) * bs]
            xb = torch.addcmul(self.shift, xb, self.scale)
            yield xb.contiguous(memory_format=self.memory_format), yb
