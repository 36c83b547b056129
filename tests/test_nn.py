"""Encoders, heads and the encoder registry."""

import pytest
import torch
from torch import nn

from nearfar.nn import (
    MLP,
    ProjectionHead,
    ResNet18,
    SmallCNN,
    build_encoder,
    parameter_count,
    register_encoder,
)


@pytest.mark.parametrize("out_dim", [None, 48])
def test_small_cnn_shapes(out_dim):
    enc = SmallCNN(1, widths=(8, 16), out_dim=out_dim)
    z = enc(torch.rand(3, 1, 28, 28))
    assert z.shape == (3, enc.out_dim)
    assert enc.out_dim == (16 if out_dim is None else 48)


def test_small_cnn_channels_last_matches():
    torch.manual_seed(0)
    enc = SmallCNN(3, widths=(8, 16)).eval()
    x = torch.rand(2, 3, 16, 16)
    ref = enc(x)
    enc = enc.to(memory_format=torch.channels_last)
    out = enc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_resnet18_cifar_stem():
    enc = ResNet18(in_channels=1, width=8)
    first = enc.stem[0]
    assert isinstance(first, nn.Conv2d)
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.in_channels == 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in enc.modules())
    z = enc(torch.rand(2, 1, 32, 32))
    assert z.shape == (2, 64) and enc.out_dim == 64


def test_resnet18_full_width_parameter_count():
    # the CIFAR ResNet-18 backbone (no classifier): 11.17 M parameters with 3 input channels
    assert parameter_count(ResNet18()) == 11_168_832


def test_mlp_flattens_and_checks_width():
    enc = MLP(in_dim=2 * 4 * 4, hidden_dims=(16,), out_dim=5)
    assert enc(torch.rand(3, 2, 4, 4)).shape == (3, 5)
    with pytest.raises(ValueError, match="expected 32 features after flattening, got 48"):
        enc(torch.rand(3, 3, 4, 4))


def test_projection_head_is_linear_bn_relu_linear():
    head = ProjectionHead(16, 32, 8)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.rand(4, 16)).shape == (4, 8)
    assert len(ProjectionHead(16, 32, 8, num_layers=3).net) == 7
    with pytest.raises(ValueError, match="hidden_dim: expected an integer >= 1, got 0"):
        ProjectionHead(16, 0, 8)


def test_registry_builds_and_lists_names():
    assert isinstance(build_encoder("small_cnn", in_channels=3), SmallCNN)
    assert isinstance(build_encoder("resnet18", width=4), ResNet18)
    with pytest.raises(ValueError, match="encoder 'vgg': unknown name; known encoders: ") as err:
        build_encoder("vgg")
    assert all(name in str(err.value) for name in ("mlp", "resnet18", "small_cnn"))
    with pytest.raises(ValueError, match="encoder 'mlp': bad keyword arguments"):
        build_encoder("mlp", depth=3)


def test_register_encoder_and_duplicate():
    @register_encoder("test_tiny_linear")
    def tiny(in_dim: int = 4):
        m = nn.Linear(in_dim, 2)
        m.out_dim = 2
        return m

    assert build_encoder("test_tiny_linear").out_dim == 2
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("test_tiny_linear")(lambda: None)


def test_parameter_count_trainable_only():
    enc = SmallCNN(1, widths=(4,))
    total = parameter_count(enc)
    assert total == 1 * 4 * 9 + 4 + 4  # conv (no bias) + BN weight and bias
    enc.features[0][1].weight.requires_grad_(False)
    assert parameter_count(enc, trainable_only=True) == total - 4
