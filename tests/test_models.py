"""Models: parameter counts, shapes, no BatchNorm, WS conv, BN replacement, torch.func grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dpmicroadam.models import (
    MODEL_NAMES,
    WideResNet,
    WSConv2d,
    build_model,
    replace_batchnorm,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tanh_cnn_28_has_26010_parameters():
    model = build_model("cnn", (1, 28, 28), 10)
    # conv 1040 + conv 8224 + linear 16416 + linear 330 (Papernot et al.; Tramèr & Boneh)
    assert _count(model) == 26_010
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_tanh_cnn_32_matches_published_cifar_layout():
    model = build_model("cnn", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert _count(model) == 550_570  # the ≈551 k of Tramèr & Boneh's CIFAR-10 CNN
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_refuses_other_sizes():
    with pytest.raises(ValueError, match="use 'mlp'"):
        build_model("cnn", (1, 8, 8), 10)


def test_mlp_defaults_and_hidden_sizes():
    small = build_model("mlp", (1, 8, 8), 10)
    assert _count(small) == 64 * 128 + 128 + 128 * 10 + 10
    custom = build_model("mlp", (1, 28, 28), 10, hidden_sizes=(32, 16), activation="relu")
    assert _count(custom) == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert any(isinstance(m, nn.ReLU) for m in custom.modules())
    assert custom(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", (1, 8, 8), 10, activation="gelu")


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model("resnet50", (3, 32, 32), 10)
    assert all(name in str(info.value) for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (1, 8, 8), 1)


def test_wrn16_4_parameter_count_shape_and_norms():
    model = build_model("wrn16-4", (3, 32, 32), 10)
    count = _count(model)
    assert count == 2_753_402
    assert 2_700_000 <= count <= 2_800_000  # SPEC §4: ≈2.75 M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(c, WSConv2d) for c in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_groups == 16 for n in norms)
    widths = sorted({c.out_channels for c in convs})
    assert widths == [16, 64, 128, 256]
    gray = WideResNet(num_classes=7, in_channels=1)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=15)


def test_wsconv_standardizes_each_output_channel():
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(2.0)
        conv.gain.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]))
    assert torch.equal(conv.bias, torch.zeros(5))
    w = conv.standardized_weight().detach().double()
    fan_in = 3 * 3 * 3
    flat = w.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5, dtype=torch.double), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        fan_in * flat.var(1, unbiased=False), conv.gain.detach().double() ** 2, rtol=1e-5, atol=0
    )
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, w.float(), conv.bias, padding=1))


def test_wsconv_variance_floor():
    conv = WSConv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1e-3, -1e-3]).view(1, 2, 1, 1))
    # fan_in * var = 2 * 1e-6 < 1e-4, so the denominator is sqrt(1e-4) = 1e-2
    expected = torch.tensor([0.1, -0.1]).view(1, 2, 1, 1)
    torch.testing.assert_close(conv.standardized_weight().detach(), expected)


def test_replace_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.BatchNorm2d(64),
        nn.Sequential(nn.Conv2d(64, 10, 1), nn.BatchNorm2d(10, affine=False)),
        nn.Flatten(),
        nn.Linear(10 * 4 * 4, 48),
        nn.BatchNorm1d(48),
    )
    with torch.no_grad():
        model[1].weight.uniform_()
        model[1].bias.uniform_()
    weight = model[1].weight.detach().clone()
    out = replace_batchnorm(model)
    assert out is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn64, gn10, gn48 = model[1], model[2][1], model[5]
    assert isinstance(gn64, nn.GroupNorm) and gn64.num_groups == 32
    assert torch.equal(gn64.weight.detach(), weight)
    assert gn10.num_groups == 2 and not gn10.affine
    assert gn48.num_groups == 16
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 48)
    # Examples are now independent: one example's output does not depend on the others.
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    assert replace_batchnorm(nn.Sequential(nn.BatchNorm2d(12)), groups=8)[0].num_groups == 4
    with pytest.raises(ValueError, match="groups"):
        replace_batchnorm(model, groups=0)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)), ("wrn16-4", (3, 32, 32))],
)
def test_per_example_grads_with_torch_func(name, shape):
    """vmap(grad) gives each example's own gradient. In float64: in float32, a pre-activation
    within rounding of zero can take the other side of a ReLU in the batched convolution than in
    the single-example one (sixteenth session, an AMD EPYC: one such position of WRN-16-4's
    blocks.0.conv1 at |y| < 1e-5 moved its weight gradient by 1.3e-2 relative), which is rounding,
    not a wrong gradient."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = torch.tensor([3, 7])

    def loss(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_example[k][i], p.grad, rtol=1e-4, atol=1e-5)
