"""Models for the demo and the benchmarks, written here (no torchvision dependency)."""

from .digits import DigitsMLP, DigitsNet
from .gpt import GPTStack, gpt2_small_stack
from .resnet import ResNet, resnet18_cifar, resnet50
from .vit import ViT, vit_base, vit_small, vit_tiny
from .wideresnet import WideResNet, wide_resnet28_10

__all__ = [
    "DigitsMLP",
    "DigitsNet",
    "GPTStack",
    "ResNet",
    "ViT",
    "WideResNet",
    "gpt2_small_stack",
    "resnet18_cifar",
    "resnet50",
    "vit_base",
    "vit_small",
    "vit_tiny",
    "wide_resnet28_10",
]
