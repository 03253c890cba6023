"""ResNet-12 (metarun.models.ResNet12): shapes, size, normalization, argument checks, vmap. Its
meta-gradients are checked with every other model's in tests/test_meta_gradients.py (case resnet12)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.func import functional_call, vmap

from metarun.models import BatchStatNorm, ResNet12
from metarun.utils.errors import ConfigError
from tests.conftest import compose_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("in_channels, size, pixels", [(1, 28, 1), (3, 84, 5)])
def test_output_and_feature_map_shapes(in_channels, size, pixels):
    """Four 2x2 max-pools (floor): 28 -> 14 -> 7 -> 3 -> 1 (Omniglot), 84 -> 42 -> 21 -> 10 -> 5 (MiniImagenet)."""
    torch.manual_seed(0)
    model = ResNet12(in_channels, 5, size, channels=(8, 8, 8, 16))
    x = torch.rand(4, in_channels, size, size)
    assert model.blocks(x).shape == (4, 16, pixels, pixels)
    assert model(x).shape == (4, 5)


def test_default_widths_on_84x84_have_the_standard_parameter_count():
    """Per block of width c on c_in channels: three 3x3 convs without bias (9 c_in c + 2 x 9 c^2), the
    1x1 shortcut (c_in c) and four norms (weight and bias: 4 x 2c); then the head (640 x 5 + 5)."""
    model = ResNet12(in_channels=3, out_features=5, image_size=84)
    widths = [3, 64, 160, 320, 640]
    expected = sum(9 * a * b + 2 * 9 * b * b + a * b + 4 * 2 * b for a, b in zip(widths, widths[1:])) + 640 * 5 + 5
    assert expected == 12_427_525  # the ~12.4 M usually quoted for ResNet-12
    assert sum(p.numel() for p in model.parameters()) == expected


def test_normalization_is_batch_stat_norm_only_and_nothing_is_a_buffer():
    model = ResNet12(1, 5, 28, channels=(4, 4, 4, 4))
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert sum(isinstance(m, BatchStatNorm) for m in model.modules()) == 4 * 4  # three convs and the shortcut per block
    assert list(model.buffers()) == []
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))  # batch norm follows each


@pytest.mark.parametrize("kwargs, match", [
    ({"channels": []}, r"model\.channels must list at least one"),
    ({"channels": [64, 0, 320, 640]}, r"model\.channels must all be >= 1"),
    ({"channels": [64, -160, 320, 640]}, r"model\.channels must all be >= 1"),
    ({"leaky_slope": -0.1}, r"model\.leaky_slope must be >= 0"),
    ({"image_size": 12}, r"needs image_size >= 16, got 12"),
    ({"out_features": 0}, r"out_features must be >= 1"),
])
def test_bad_arguments_raise_a_one_line_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        ResNet12(**kwargs)
    assert "\n" not in str(info.value)


def test_three_blocks_take_images_down_to_8x8():
    assert ResNet12(1, 5, 8, channels=(4, 4, 4))(torch.rand(2, 1, 8, 8)).shape == (2, 5)


def test_composed_config_builds_it_with_the_tasks_sizes():
    cfg = compose_config("task=omniglot", "model=resnet12", "model.channels=[4,8,8,16]")
    model = instantiate(cfg.model, out_features=5, in_channels=1, image_size=28)
    assert isinstance(model, ResNet12) and model.head.in_features == 16 and model.head.out_features == 5
    assert [b.conv1.out_channels for b in model.blocks] == [4, 8, 8, 16]


def test_functional_call_under_vmap_equals_a_loop_over_tasks():
    """Per-task parameters and per-task batch statistics, as the meta-learning code calls the model."""
    torch.manual_seed(0)
    model = ResNet12(1, 3, 16, channels=(4, 4, 4, 4)).double()
    params = {k: torch.stack([p.detach(), p.detach() * 1.1]) for k, p in model.named_parameters()}
    x = torch.rand(2, 6, 1, 16, 16, dtype=torch.float64)
    batched = vmap(lambda p, xi: functional_call(model, p, (xi,)))(params, x)
    looped = torch.stack([functional_call(model, {k: v[i] for k, v in params.items()}, (x[i],)) for i in range(2)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


# --- conv4's options for matching a reference network (parity/) ---------------------------------

def test_conv4_xavier_init_and_leaky_relu_are_what_they_say():
    import math

    from metarun.models import Conv4

    torch.manual_seed(0)
    xavier = Conv4(1, 5, 64, 28, init="xavier", activation="leaky_relu")
    for module in xavier.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = math.sqrt(6 / (fan_in + fan_out))
            w = module.weight.detach()
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound  # glorot-uniform's range
            assert float(module.bias.detach().abs().max()) == 0.0
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in xavier.modules()) == 4
    gained = Conv4(1, 5, 64, 28, init="xavier", init_gain=1.73)
    bound = 1.73 * math.sqrt(6 / (9 * 64 * 2))
    assert bound * 0.9 < float(gained.features[3].weight.detach().abs().max()) <= bound
    plain = Conv4(1, 5, 64, 28)  # torch's default: bound 1 / sqrt(fan_in), nonzero biases, ReLU
    assert float(plain.features[3].weight.detach().abs().max()) <= 1 / math.sqrt(9 * 64)
    assert float(plain.features[0].bias.detach().abs().max()) > 0
    assert not any(isinstance(m, nn.LeakyReLU) for m in plain.modules())
    for kwargs, match in (({"init": "he"}, "model.init must be"), ({"activation": "gelu"}, "model.activation must be")):
        with pytest.raises(ConfigError, match=match):
            Conv4(**kwargs)
