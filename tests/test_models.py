"""The model zoo: shape contract, gradients, determinism and the papers' parameter counts."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from sr_tune.models import SRGANDiscriminator, create_model, get_builder, list_models, register_model

SCALES = (2, 3, 4)


def default_channels(name: str) -> int:
    return inspect.signature(get_builder(name)).parameters["in_channels"].default


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_every_family():
    assert list_models() == sorted(
        [
            "cnn_deep",
            "cnn_medium",
            "cnn_small",
            "edsr_baseline",
            "espcn",
            "fsrcnn",
            "fsrcnn_s",
            "srcnn_915",
            "srcnn_955",
            "srcnn_ex",
            "srresnet",
            "vdsr",
            "waifu2x_cnn",
            "waifu2x_vgg7",
        ]
    )


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_contract(name, scale, channels):
    model = create_model(name, scale=scale, in_channels=channels)
    lr = torch.rand(2, channels, 13, 10)  # odd, non-square on purpose
    assert model(lr).shape == (2, channels, 13 * scale, 10 * scale)


@pytest.mark.parametrize("name", list_models())
def test_gradients_are_finite_and_reach_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, scale=2, in_channels=default_channels(name))
    lr = torch.rand(2, default_channels(name), 12, 12)
    model(lr).pow(2).mean().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_fixed_seed_gives_identical_model_and_output(name):
    channels = default_channels(name)
    lr = torch.rand(1, channels, 9, 9)
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outputs.append(create_model(name, scale=3, in_channels=channels).eval()(lr))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[2])


def conv_weights(module: nn.Module) -> int:
    """Weights of conv / transposed-conv kernels only: the count the SRCNN and FSRCNN papers quote."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_srcnn_weight_counts_match_the_paper():
    assert conv_weights(create_model("srcnn_915", scale=3)) == 8_032
    assert conv_weights(create_model("srcnn_955", scale=3)) == 57_184


@pytest.mark.parametrize("scale", SCALES)
def test_fsrcnn_has_12464_weights(scale):
    # Dong et al. 2016, Table 1: FSRCNN(56, 12, 4) on one channel; the count does not depend on scale.
    assert conv_weights(create_model("fsrcnn", scale=scale, in_channels=1)) == 12_464


def test_vdsr_and_espcn_weight_counts():
    assert conv_weights(create_model("vdsr", scale=2)) == 3 * 3 * 64 * (1 + 18 * 64 + 1)  # 664,704
    assert conv_weights(create_model("espcn", scale=3)) == 5 * 5 * 64 + 3 * 3 * 64 * 32 + 3 * 3 * 32 * 9


# Per-layer parameter counts (weights + biases) as tabulated in the seed report.
REPORT_TABLES = {
    "cnn_small": [80, 1_168, 435],
    "cnn_medium": [160, 4_640, 18_496, 18_464, 867],
    "cnn_deep": [320, 18_496, 73_856, 147_584, 73_792, 18_464, 867],
    "waifu2x_cnn": [320, 9_248, 18_496, 36_928, 73_856, 147_584, 3_459],
}


@pytest.mark.parametrize("name", sorted(REPORT_TABLES))
def test_plain_cnns_match_the_report_tables(name):
    model = create_model(name, scale=2, in_channels=1, out_channels=3)
    per_layer = [parameter_count(m) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert per_layer == REPORT_TABLES[name]
    lr = torch.rand(1, 1, 8, 8)
    assert model(lr).shape == (1, 3, 16, 16)


def test_waifu2x_vgg7_is_valid_convolutions_with_leaky_relu():
    model = create_model("waifu2x_vgg7", scale=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 1]
    assert all(c.padding == (0, 0) and c.kernel_size == (3, 3) for c in convs)
    assert parameter_count(model) == sum(REPORT_TABLES["waifu2x_cnn"][:-1]) + 128 * 9 + 1


def test_edsr_baseline_counts_match_the_published_model():
    # EDSR-baseline as released by Lim et al.: 1.37M (x2), 1.55M (x3), 1.52M (x4).
    counts = [parameter_count(create_model("edsr_baseline", scale=s)) for s in SCALES]
    assert counts == [1_369_859, 1_554_499, 1_517_571]


def test_srresnet_count_and_residual_scaling_option():
    # 9x9 head + 16 blocks (2 convs, 2 BN, PReLU) + conv-BN + two x2 sub-pixel stages + 9x9 tail.
    head, block, fuse = 9 * 9 * 3 * 64 + 64 + 64, 2 * (9 * 64 * 64 + 64) + 4 * 64 + 64, 9 * 64 * 64 + 64 + 128
    stage, tail = 9 * 64 * 256 + 256 + 64, 9 * 9 * 64 * 3 + 3
    assert parameter_count(create_model("srresnet", scale=4)) == head + 16 * block + fuse + 2 * stage + tail
    assert create_model("edsr_baseline", scale=2, res_scale=0.1).blocks[0].res_scale == 0.1


@pytest.mark.parametrize("size", [96, 128, 48])
def test_srgan_discriminator_takes_any_patch_size(size):
    discriminator = SRGANDiscriminator()
    convs = [m for m in discriminator.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2] * 4
    assert discriminator(torch.rand(2, 3, size, size)).shape == (2,)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown model 'srcnn'; available: cnn_deep"):
        create_model("srcnn", scale=2)


def test_unknown_argument_names_the_accepted_ones():
    with pytest.raises(TypeError, match=r"vdsr' got unknown argument\(s\) width; it accepts: depth, in_channels"):
        create_model("vdsr", scale=2, width=32)


def test_unsupported_scale_is_refused():
    with pytest.raises(ValueError, match="supports scale 2, 3, 4; got 5"):
        create_model("fsrcnn", scale=5)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def fsrcnn(scale: int) -> nn.Module:  # noqa: F811
            return nn.Identity()
