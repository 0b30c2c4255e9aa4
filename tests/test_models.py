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


def test_gpt2_small_stack_size_and_causality():
    from ssam.models import GPTStack, gpt2_small_stack

    with torch.device("meta"):
        # GPT-2 small has 124,439,808 parameters; without wte (50257 x 768) and wpe (1024 x 768)
        assert sum(p.numel() for p in gpt2_small_stack().parameters()) == 124_439_808 - 50257 * 768 - 1024 * 768
    torch.manual_seed(0)
    model = GPTStack(16, 2, 4)
    x = torch.randn(2, 7, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 3, 16)  # change only the future of token 3
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 7, 16)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    with pytest.raises(ValueError, match="multiple of heads"):
        GPTStack(10, 1, 4)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 16\]"):
        model(torch.randn(7, 16))
