"""PyTorch reference networks, written as the tutorials write them.

Keys follow torchvision: ``features.N.*`` / ``classifier.N.*`` for VGG (``classifier.6.0.*`` ...
for the transfer head), ``conv1.*`` ... ``fc3.*`` for the small nets. `VGG(cfg, avgpool=True,
batch_norm=...)` accepts the state_dict of any ``torchvision.models.vgg*()`` unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# Simonyan & Zisserman 2015, Table 1 (configurations A, B, D, E = VGG11, 13, 16, 19), as torchvision's cfgs.
CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
DEPTHS = {11: "A", 13: "B", 16: "D", 19: "E"}


def make_layers(cfg: list[int | str], in_channels: int = 3, batch_norm: bool = False) -> nn.Sequential:
    """3x3 conv (padding 1) [+ BatchNorm2d] + ReLU per width, 2x2 max-pool per "M" (torchvision's make_layers)."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG as the paper describes it (``avgpool=False``: flatten what the last pool leaves, e.g. 512
    at 32x32 or 25,088 at 224x224) or as torchvision builds it (``avgpool=True``: AdaptiveAvgPool2d((7, 7)))."""

    def __init__(self, cfg: str = "A", num_classes: int = 1000, image_size: int = 224, avgpool: bool = False,
                 dropout: float = 0.5, batch_norm: bool = False):
        super().__init__()
        self.features = make_layers(CFGS[cfg], batch_norm=batch_norm)
        if avgpool:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            flat = 512 * 7 * 7
        else:
            self.avgpool = nn.Identity()
            side = image_size // 32  # five 2x2 max-pools
            flat = 512 * side * side
        self.classifier = nn.Sequential(
            nn.Linear(flat, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        # torchvision.models.VGG's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16_transfer(num_classes: int = 100) -> VGG:
    """The transfer-learning tutorial: torchvision VGG16, everything frozen, classifier[6] replaced by
    Linear(4096, 256) -> ReLU -> Dropout(0.4) -> Linear(256, n) -> LogSoftmax (the only trainable part)."""
    model = VGG("D", num_classes=1000, avgpool=True)
    for p in model.parameters():
        p.requires_grad = False
    n_inputs = model.classifier[6].in_features
    model.classifier[6] = nn.Sequential(
        nn.Linear(n_inputs, 256), nn.ReLU(), nn.Dropout(0.4),
        nn.Linear(256, num_classes), nn.LogSoftmax(dim=1),
    )
    return model


class CifarCNN(nn.Module):
    """The CIFAR-10 tutorial CNN (537,610 parameters), log-probabilities out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3)
        self.conv2 = nn.Conv2d(64, 128, 3)
        self.conv3 = nn.Conv2d(128, 256, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(2 * 2 * 256, 128)
        self.fc2 = nn.Linear(128, 256)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = x.view(-1, 2 * 2 * 256)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class MnistLinear(nn.Module):
    """The MNIST lab's linear baseline (7,850 parameters), log-probabilities out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


class MnistLeNet(nn.Module):
    """LeNet-5-like net for 1x28x28 (61,706 parameters), log-probabilities out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def build(name: str, num_classes: int | None = None, image_size: int = 224) -> nn.Module:
    """The torch original of a `jaxvgg.list_models()` name (``image_size`` matters for ``vgg11`` only)."""
    builders = {
        **{f"vgg{d}{'_bn' * bn}": partial(VGG, cfg, image_size=image_size, batch_norm=bn)
           for d, cfg in DEPTHS.items() for bn in (False, True)},
        **{f"vgg{d}{'_bn' * bn}_torchvision": partial(VGG, cfg, avgpool=True, batch_norm=bn)
           for d, cfg in DEPTHS.items() for bn in (False, True)},
        "vgg16_transfer": vgg16_transfer,
        "cifar_cnn": CifarCNN,
        "mnist_linear": MnistLinear,
        "mnist_lenet": MnistLeNet,
    }
    defaults = {**{name: 1000 for name in builders if name.startswith("vgg")}, "vgg16_transfer": 100}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(builders))}")
    return builders[name](num_classes if num_classes is not None else defaults.get(name, 10))
