"""The paper's published accuracies (Petersen et al., NeurIPS 2024), so reports can print them beside ours.

Only numbers the paper states as text are here; its figures (CIFAR-10, ViT, λ sweeps) give no data points.
"""

import math
import re

# Table 1: CIFAR-100, 200 epochs, mean of 5 seeds, TrAct with λ = 0.1.
# model -> (baseline top-1, baseline top-5, TrAct top-1, TrAct top-5)
CIFAR100_TABLE1 = {
    "SqueezeNet": (69.45, 91.09, 70.48, 91.50),
    "MobileNet": (66.99, 88.95, 67.06, 89.12),
    "MobileNetV2": (67.76, 90.80, 67.89, 90.91),
    "ShuffleNet": (69.98, 91.18, 69.97, 91.45),
    "ShuffleNetV2": (69.31, 90.91, 69.88, 91.02),
    "VGG-11": (68.44, 88.02, 69.66, 88.99),
    "VGG-13": (71.96, 90.27, 72.98, 90.78),
    "VGG-16": (72.12, 89.81, 72.73, 90.11),
    "VGG-19": (71.13, 88.10, 71.45, 88.42),
    "DenseNet121": (78.93, 94.83, 79.55, 94.92),
    "DenseNet161": (79.95, 95.25, 80.47, 95.37),
    "DenseNet201": (79.39, 95.07, 79.94, 95.17),
    "GoogLeNet": (76.85, 93.53, 77.18, 93.86),
    "Inception-v3": (79.40, 94.94, 79.24, 95.04),
    "Inception-v4": (77.32, 93.80, 77.14, 93.90),
    "Inception-RN-v2": (75.59, 93.00, 75.73, 93.32),
    "Xception": (77.57, 93.92, 77.71, 93.97),
    "ResNet18": (76.13, 93.01, 76.67, 93.29),
    "ResNet34": (77.34, 93.78, 77.87, 93.75),
    "ResNet50": (78.20, 94.28, 79.07, 94.67),
    "ResNet101": (79.07, 94.71, 79.51, 94.87),
    "ResNet152": (78.86, 94.65, 79.83, 94.96),
    "ResNeXt50": (78.55, 94.61, 78.92, 94.80),
    "ResNeXt101": (79.13, 94.85, 79.54, 94.84),
    "ResNeXt152": (79.26, 94.69, 79.48, 94.89),
    "SE-ResNet18": (76.25, 93.09, 76.77, 93.36),
    "SE-ResNet34": (77.85, 93.88, 78.20, 94.13),
    "SE-ResNet50": (77.78, 94.33, 78.79, 94.53),
    "SE-ResNet101": (77.94, 94.22, 79.19, 94.70),
    "SE-ResNet152": (78.10, 94.46, 79.35, 94.73),
    "NASNet": (77.76, 94.26, 78.17, 94.35),
    "Wide-RN-40-10": (78.93, 94.42, 79.60, 94.80),
    "StochD-RN-18": (75.39, 94.09, 75.44, 94.13),
    "StochD-RN-34": (78.03, 94.81, 78.16, 94.97),
    "StochD-RN-50": (77.02, 94.61, 77.40, 94.78),
    "StochD-RN-101": (78.72, 94.67, 78.96, 94.75),
}

# The paper abbreviates some names; these are the spellings the CIFAR-100 codebase it used gives them.
_ALIASES = {
    "inceptionresnetv2": "Inception-RN-v2",
    "wideresnet": "Wide-RN-40-10",
    "wrn4010": "Wide-RN-40-10",
    "stochasticdepth18": "StochD-RN-18",
    "stochasticdepth34": "StochD-RN-34",
    "stochasticdepth50": "StochD-RN-50",
    "stochasticdepth101": "StochD-RN-101",
}

# Table 2: ImageNet-1k ResNet-50, TrAct with λ = 0.1.
# epochs -> (baseline top-1, baseline top-5, TrAct top-1, TrAct top-5)
IMAGENET_RESNET50_TABLE2 = {
    30: (71.96, 90.70, 73.48, 91.61),
    60: (74.98, 92.36, 75.68, 92.78),
    90: (75.70, 92.74, 76.20, 93.12),
}

PAPER_LAM = 0.1  # both tables report TrAct only at the default λ


def _key(name: str) -> str:
    # "VGG-11", "vgg11" and "vgg_11" must all find the same row.
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CIFAR100_BY_KEY = {_key(name): row for name, row in CIFAR100_TABLE1.items()}
_CIFAR100_BY_KEY.update({alias: CIFAR100_TABLE1[name] for alias, name in _ALIASES.items()})


def paper_accuracy(dataset: str, classes, model: str, epochs: int, lam) -> tuple[float, float] | None:
    """The paper's (top-1, top-5) for this setting, or None where it publishes no number.

    `lam` is None for the baseline; `classes` is the ImageNet subset's class selection (`all` = ImageNet-1k).
    """
    if lam is not None and not math.isclose(lam, PAPER_LAM):
        return None
    if dataset == "cifar100" and epochs == 200:
        row = _CIFAR100_BY_KEY.get(_key(model))
    elif dataset == "imagenet_subset" and str(classes) == "all" and _key(model) == "resnet50":
        row = IMAGENET_RESNET50_TABLE2.get(epochs)
    else:
        row = None
    if row is None:
        return None
    return row[:2] if lam is None else row[2:]
