"""Loss terms: pixel losses by value, VGG19 perceptual loss through torchvision's weights API, GAN losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sr_tune.config import LossConfig
from sr_tune.losses import (
    PerceptualLoss,
    SRLoss,
    VGGDistance,
    discriminator_loss,
    generator_loss,
    load_vgg19_features,
    per_example_pixel_loss,
    pixel_loss,
)


def test_pixel_losses_by_value():
    sr, hr = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    assert pixel_loss("mse")(sr, hr).item() == pytest.approx((0.25 + 1.0) / 3)
    assert pixel_loss("l1")(sr, hr).item() == pytest.approx(0.5)
    expected = (1e-3 + math.sqrt(0.25 + 1e-6) + math.sqrt(1 + 1e-6)) / 3
    assert pixel_loss("charbonnier", 1e-3)(sr, hr).item() == pytest.approx(expected)


def test_vgg_weights_load_from_the_torch_hub_cache(vgg_cache: Path):
    features = load_vgg19_features("vgg22")
    assert len(features) == 9 and not any(p.requires_grad for p in features.parameters())
    stored = torch.load(vgg_cache, weights_only=True)
    torch.testing.assert_close(features[7].weight, stored["features.7.weight"])  # conv2_2 came from the file
    image = torch.rand(2, 1, 32, 32)  # Y input: repeated to RGB
    loss = PerceptualLoss("vgg54")
    assert loss.features(loss.normalise(image)).shape == (2, 512, 2, 2)
    assert loss(image, image).item() == 0.0 and loss(image, image.flip(-1)).item() > 0
    distances = VGGDistance()(image, image.flip(-1))
    assert set(distances) == {"vgg22", "vgg54"} and all(v.item() > 0 for v in distances.values())
    torch.testing.assert_close(distances["vgg54"], loss(image, image.flip(-1)))


def test_missing_vgg_weights_offline_name_the_file_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        load_vgg19_features("vgg54")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message


def test_adversarial_losses():
    confident_real, confident_fake = torch.full((4,), 20.0), torch.full((4,), -20.0)
    assert discriminator_loss("bce", confident_real, confident_fake).item() < 1e-6
    assert discriminator_loss("bce", confident_fake, confident_real).item() > 30
    assert generator_loss("bce", confident_real, confident_fake).item() > 15  # D sees through the fakes
    # Relativistic: only the difference between real and fake logits matters.
    shifted = generator_loss("relativistic", confident_real + 5, confident_fake + 5)
    torch.testing.assert_close(shifted, generator_loss("relativistic", confident_real, confident_fake))
    assert generator_loss("relativistic", confident_fake, confident_real).item() < 1e-6


def test_sr_loss_weights_each_term(vgg_cache: Path):
    sr, hr = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    terms = SRLoss(
        LossConfig(
            pixel="l1",
            pixel_weight=2.0,
            perceptual="vgg22",
            perceptual_weight=0.5,
            adversarial="bce",
            adversarial_weight=1e-3,
        )
    )(sr, hr, torch.zeros(2), torch.zeros(2))
    assert set(terms) == {"pixel", "perceptual", "adversarial"}
    torch.testing.assert_close(terms["pixel"], 2.0 * (sr - hr).abs().mean())
    torch.testing.assert_close(terms["adversarial"], torch.tensor(1e-3 * math.log(2)))
    assert set(SRLoss(LossConfig())(sr, hr)) == {"pixel"}


def test_a_pixel_mix_adds_weighted_terms_and_each_examples_loss_averages_to_the_batch_loss():
    sr, hr = torch.tensor([[[[0.5, 0.0]]], [[[1.0, 0.2]]]]), torch.zeros(2, 1, 1, 2)  # (2, 1, 1, 2)
    terms = SRLoss(LossConfig(pixel="l1", mix={"mse": 0.5, "charbonnier": 0.0}))(sr, hr)
    assert set(terms) == {"pixel", "mix_mse"}  # a weight of 0 switches a term off
    assert float(terms["pixel"]) == pytest.approx((0.5 + 1.2) / 4)
    assert float(terms["mix_mse"]) == pytest.approx(0.5 * (0.25 + 1.0 + 0.04) / 4)
    for name in ("mse", "l1", "charbonnier"):
        each = per_example_pixel_loss(name)(sr, hr)  # (2,)
        assert each.shape == (2,)
        assert float(each.mean()) == pytest.approx(float(pixel_loss(name)(sr, hr)))
    assert float(per_example_pixel_loss("l1")(sr, hr)[1]) == pytest.approx(0.6)
