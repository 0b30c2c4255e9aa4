import pytest
import torch

from ssam.models import DigitsMLP, DigitsNet, resnet18_cifar, resnet50, vit_base, vit_small, vit_tiny, wide_resnet28_10

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize(
    "build,params,input_shape,classes",
    [
        # published sizes: torchvision resnet50 25,557,032; timm vit_small_patch16_224 22,050,664;
        # the paper's CIFAR ResNet-18 (3x3 stem) 11,173,962; WRN-28-10 36,479,194
        (resnet18_cifar, 11_173_962, (3, 32, 32), 10),
        (wide_resnet28_10, 36_479_194, (3, 32, 32), 10),
        (resnet50, 25_557_032, (3, 224, 224), 1000),
        (vit_small, 22_050_664, (3, 224, 224), 1000),
        (vit_base, 86_567_656, (3, 224, 224), 1000),  # timm vit_base_patch16_224
        (vit_tiny, 2_693_578, (3, 32, 32), 10),
        (DigitsNet, 21_482, (1, 8, 8), 10),
        (DigitsMLP, 50_826, (1, 8, 8), 10),  # 64*256+256 + 256*128+128 + 128*10+10
    ],
)
def test_sizes_and_forward(build, params, input_shape, classes):
    torch.manual_seed(0)
    model = build()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *input_shape))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_wideresnet_depth_check():
    from ssam.models import WideResNet

    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27)
