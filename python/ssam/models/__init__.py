"""Models for the demo and the benchmarks, written here (no torchvision dependency)."""

from .digits import DigitsMLP, DigitsNet
from .resnet import ResNet, resnet18_cifar, resnet50
from .vit import ViT, vit_base, vit_small, vit_tiny
from .wideresnet import WideResNet, wide_resnet28_10

__all__ = [
    "DigitsMLP",
    "DigitsNet",
    "ResNet",
    "ViT",
    "WideResNet",
    "resnet18_cifar",
    "resnet50",
    "vit_base",
    "vit_small",
    "vit_tiny",
    "wide_resnet28_10",
]
