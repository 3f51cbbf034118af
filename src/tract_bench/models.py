"""The models of the paper's experiments (CIFAR ResNets, the CIFAR ViT) and any timm model, built from config."""

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from tract_bench.errors import UserError

CIFAR_RESNETS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
                 "resnet50": torchvision.models.resnet50}


def resnet_cifar(name: str, num_classes: int, maxpool: bool = True) -> nn.Module:
    """torchvision ResNet with a 3x3 stride-1 stem, as in the official TrAct CIFAR code (which keeps the max-pool);
    maxpool=False gives the stem of the CIFAR-100 study's codebase."""
    model = CIFAR_RESNETS[name](num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ViTCifar(nn.Module):
    """The paper's CIFAR ViT: non-overlapping patches flattened and embedded by a Linear (`emb`, TrAct's layer),
    a CLS token, learned position embeddings, pre-norm blocks, and a LayerNorm + Linear head on the CLS token."""

    def __init__(self, num_classes, image_size=32, patch=4, dim=384, depth=7, heads=12, mlp_dim=384, dropout=0.0):
        super().__init__()
        if image_size % patch:
            raise UserError(f"model.patch={patch} does not divide the image size {image_size}; pick a divisor")
        if dim % heads:
            raise UserError(f"model.dim={dim} is not divisible by model.heads={heads}")
        self.patch, self.tokens = patch, (image_size // patch) ** 2
        self.emb = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, self.tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, tokens, 3*patch*patch)
        if patches.shape[1] != self.tokens:
            raise ValueError(f"ViTCifar expects {self.tokens} patches, got {patches.shape[1]}")
        z = torch.cat([self.cls.expand(len(x), -1, -1), self.emb(patches)], dim=1) + self.pos
        return self.head(self.blocks(z)[:, 0])


def build_model(cfg_model, num_classes: int, image_size: int) -> nn.Module:
    """Build the configured model (random init: TrAct is about training from scratch)."""
    arch, name = cfg_model.arch, cfg_model.name
    if arch == "cifar_resnet":
        if name not in CIFAR_RESNETS:
            raise UserError(f"model.name={name} is not a CIFAR ResNet; use one of {', '.join(CIFAR_RESNETS)}")
        return resnet_cifar(name, num_classes, cfg_model.maxpool)
    if arch == "vit_cifar":
        return ViTCifar(num_classes, image_size, cfg_model.patch, cfg_model.dim, cfg_model.depth, cfg_model.heads,
                        cfg_model.mlp_dim, cfg_model.dropout)
    if arch == "timm":
        if not timm.is_model(name):
            raise UserError(f"unknown timm model {name!r}; list them with python -c 'import timm; "
                            f"print(timm.list_models(\"*{name[:4]}*\"))'")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **dict(cfg_model.kwargs))
    raise UserError(f"unknown model.arch={arch}; use cifar_resnet, vit_cifar or timm")


def check_fits(model: nn.Module, num_classes: int, image_size: int):
    """Fail early, before any run folder exists, when the model cannot take the dataset's images."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, image_size, image_size))
    except Exception as e:  # any shape error from deep inside the model
        raise UserError(f"the model does not fit {image_size}x{image_size} images ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); pick a model for this image size (timm: model.kwargs)") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise UserError(f"the model outputs shape {tuple(out.shape)} for 2 images, expected (2, {num_classes})")
