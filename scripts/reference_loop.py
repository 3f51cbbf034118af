"""The reference training loop: what the official TrAct CIFAR script does each step, rebuilt for comparison.

bench_train.py measures tract-train's loop against this one. It mirrors the official script's data path and
loop: a Dataset that hands out one PIL image at a time, torchvision transforms per image, a
torch.utils.data.DataLoader with worker processes, fp32, SGD with momentum and a cosine schedule stepped
every iteration, and a host sync every step to log a scalar. Nothing here is tuned: it is the baseline.
"""

import os
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

# The official script's constants (its std is not the true per-channel std; the paper's runs used these).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
LR, MOMENTUM = 0.08, 0.9  # the paper's SGD setting for CIFAR-10 ResNet-18; no weight decay, no warm-up
WORKERS = min(4, len(os.sched_getaffinity(0)))  # the official script uses 4; fewer on a smaller machine
TEST_BATCH, TEST_WORKERS = 128, min(2, WORKERS)  # its test loader

TRAIN_TRANSFORM = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                      transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
TEST_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class CifarImages(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) and labels served one PIL image at a time, as torchvision's CIFAR10 does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.images = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # HWC, what PIL expects
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_loader(dataset: CifarImages, batch_size: int, train: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """The official train loader (shuffle, drop_last, WORKERS processes) or its test loader.

    Its own generator, seeded with `seed`, draws the shuffling and the workers' augmentation seeds, so a loop's
    data order depends on its seed alone, not on what else used the global RNG before it.
    """
    if train:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                           num_workers=WORKERS, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=TEST_WORKERS)


def reference_optimizer(model: torch.nn.Module, total_steps: int):
    """SGD with momentum and a cosine schedule to 0 over `total_steps` iterations."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def reference_train_steps(model, batches, optimizer, scheduler, device) -> list[float]:
    """Train on every (images, labels) batch of `batches` as the official loop does; return the step losses.

    Batches arrive on the host and are copied per step; `.item()` every step, as the official script logs
    its running accuracy, makes the host wait for the device each iteration.
    """
    model.train()
    losses = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def reference_evaluate(model, loader, device) -> float:
    """Top-1 accuracy (percent) over the whole split: correct / total."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100 * correct / total


class ReferenceLoop:
    """The functions above as one loop, with bench_train.FastLoop's interface; datasets are shared, loaders its own."""

    def __init__(self, model, train_set, test_set, batch, device, total_steps, seed=0):
        self.device, self.model = device, model.to(device)
        self.loader = reference_loader(train_set, batch, train=True, seed=seed)
        self.test_loader = reference_loader(test_set, TEST_BATCH, train=False)
        self.optimizer, self.scheduler = reference_optimizer(self.model, total_steps)

    def batches(self):
        """Training batches without end; each pass over the DataLoader starts its workers anew."""
        while True:
            yield from self.loader

    def train(self, batches) -> float:
        torch.backends.cudnn.benchmark = False  # the official script leaves cuDNN's default
        return statistics.fmean(reference_train_steps(self.model, batches, self.optimizer, self.scheduler,
                                                      self.device))

    def test_top1(self) -> float:
        return reference_evaluate(self.model, self.test_loader, self.device)
