"""The training loop without Ray or MLflow: learning, schedules, GAN steps, resume, fine-tuning, failures."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import OptimizerConfig, load_config
from sr_tune.data.degrade import imresize, to_8bit
from sr_tune.data.sources import BadImageError, skimage_photo
from sr_tune.engine import EmaUpdate, LossWindow, build_data, ema_decay_at, evaluate, train
from sr_tune.fields import ConfigError
from sr_tune.metrics import psnr, rgb_to_y
from sr_tune.models import create_model
from sr_tune.optim import build_optimizer, lr_factor, parameter_groups
from sr_tune.visualize import grid_captions, preview_grid

from .conftest import REPO, Interrupted, stopped_at

QUICK = ["training.device=cpu", "data.val_crop=48"]


def test_srcnn_beats_bicubic_on_the_sample_photographs():
    # 750 steps of 32 patches on 8-bit LR; an EMA of the weights smooths the last steps' noise. Measured: +0.24 dB
    # over bicubic at 750 steps (+0.03 at 500; float LR: +0.09 at 500, +0.29 at 750).
    config = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            "training.steps=750",
            "training.eval_interval=375",
            "optimizer.lr=2e-3",
            "data.batch_size=32",
            "optimizer.ema_decay=0.98",
            "training.device=cpu",
        ],
    )
    result = train(config)
    assert result.final.psnr > result.final.bicubic_psnr + 0.15, result.final
    assert result.history[0].loss > result.final.loss


def test_schedules_and_warmup():
    config = load_config(None, ["optimizer.schedule=cosine", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1"])
    factors = [lr_factor(config.optimizer, step, 110) for step in (1, 5, 10, 60, 110)]
    assert factors == pytest.approx([0.1, 0.5, 1.0, 0.55, 0.1])
    step = load_config(None, ["optimizer.schedule=step", "optimizer.step_size=100", "optimizer.gamma=0.1"]).optimizer
    assert [lr_factor(step, s, 1000) for s in (1, 100, 101, 250)] == pytest.approx([1, 1, 0.1, 0.01])


def test_unknown_optimizer_and_schedule_names_raise_instead_of_falling_back():
    with pytest.raises(ConfigError, match="name: 'lamb' is not valid"):
        OptimizerConfig(name="lamb")
    with pytest.raises(ConfigError, match="schedule: 'linear' is not valid"):
        OptimizerConfig(schedule="linear")
    # The builders refuse them too, whatever hands them a name (no silent RMSprop or constant schedule).
    unchecked = SimpleNamespace(**{**vars(OptimizerConfig()), "name": "lamb", "schedule": "linear"})
    with pytest.raises(ValueError, match="optimizer.name: 'lamb' is not an optimizer"):
        build_optimizer(unchecked, parameter_groups(create_model("fsrcnn", scale=2), 1e-3, 1.0))
    with pytest.raises(ValueError, match="optimizer.schedule: 'linear' is not a schedule"):
        lr_factor(unchecked, 1, 10)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_update_in_fused_kernels_as_the_reference_loop_does(name: str):
    config = OptimizerConfig(name=name, lr=1e-2, weight_decay=1e-3)
    model = create_model("fsrcnn", scale=2)
    reference, before = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(config, parameter_groups(model, config.lr, 0.5))
    plain_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    extra = {"momentum": config.momentum} if name == "sgd" else {"betas": config.betas}
    plain = plain_class(
        parameter_groups(reference, config.lr, 0.5), lr=config.lr, weight_decay=1e-3, foreach=False, **extra
    )
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    lr = torch.rand(4, 1, 12, 12)
    for _ in range(3):
        for net, optimizer in ((model, fused), (reference, plain)):
            optimizer.zero_grad()
            net(lr).square().mean().backward()
            optimizer.step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(model.parameters()), next(before.parameters()))  # it did train


def test_the_last_layer_gets_its_own_learning_rate():
    model = create_model("srcnn_915", scale=3)
    body, head = parameter_groups(model, 1e-4, 0.1)
    assert [p is q for p, q in zip(head["params"], model.reconstruct.parameters())] == [True, True]
    assert len(body["params"]) == 4 and head["lr"] == pytest.approx(1e-5)
    seen: list[float] = []
    config = load_config(
        None,
        [
            *QUICK,
            "training.steps=3",
            "training.eval_interval=3",
            "optimizer.name=sgd",
            "optimizer.lr=1e-4",
            "optimizer.last_layer_lr_scale=0.1",
        ],
    )
    train(config, on_eval=lambda result, _: seen.append(result.lr))
    assert seen == [pytest.approx(1e-4)]


def test_a_diverging_run_names_the_step_and_the_loss_term():
    config = load_config(
        None, [*QUICK, "training.steps=200", "optimizer.name=sgd", "optimizer.lr=10", "optimizer.momentum=0.99"]
    )
    with pytest.raises(FloatingPointError, match=r"step \d+: loss term pixel = (nan|inf)"):
        train(config)


def test_the_loss_window_averages_each_term_and_names_the_first_step_that_was_not_finite():
    window = LossWindow()
    for step in range(11, 211):
        pixel = torch.tensor(step / 10)
        window.add(step, {"total": pixel * 2, "pixel": pixel, "vgg": pixel}, patches=16)
    means, _ = window.close(steps=200, world_size=1)
    assert means == pytest.approx({"total": 2 * 11.05, "pixel": 11.05, "vgg": 11.05})
    assert window.patches == 3200

    window = LossWindow()
    for step, pixel in enumerate([0.5, 0.25, float("inf"), float("nan"), 0.5], start=101):
        window.add(step, {"total": torch.tensor(pixel + 1), "pixel": torch.tensor(pixel), "ssim": torch.tensor(1.0)}, 1)
    with pytest.raises(FloatingPointError, match=r"^step 103: loss term pixel = inf is not finite"):
        window.close(steps=5, world_size=1)

    window = LossWindow()  # finite terms whose sum overflowed name the total
    window.add(7, {"total": torch.tensor(float("inf")), "pixel": torch.tensor(3e38), "vgg": torch.tensor(3e38)}, 1)
    with pytest.raises(FloatingPointError, match=r"^step 7: loss term total = inf"):
        window.close(steps=1, world_size=1)


def test_resume_after_a_stop_continues_exactly(tmp_path: Path):
    overrides = [
        *QUICK,
        "training.steps=40",
        "training.eval_interval=10",
        "optimizer.schedule=cosine",
        "optimizer.ema_decay=0.9",
        "data.augment_strength=0.5",
    ]
    config = load_config(REPO / "configs" / "smoke.yaml", overrides)
    uninterrupted = train(config).history

    with pytest.raises(Interrupted):
        train(config, on_eval=stopped_at(20), checkpoint_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "last")
    assert checkpoint.step == 20 and checkpoint.group("ema") and checkpoint.group("optimizer")
    resumed = train(config, resume=checkpoint, checkpoint_dir=tmp_path).history
    assert [r.step for r in resumed] == [10, 20, 30, 40]
    assert [r.loss for r in resumed] == [r.loss for r in uninterrupted]
    assert [r.psnr for r in resumed] == [r.psnr for r in uninterrupted]


def test_on_eval_can_stop_a_run_and_a_resume_takes_new_hyperparameters_keeping_the_state(tmp_path: Path):
    """What PBT needs: stop at an evaluation; continue from that state under a new lr and L2."""
    overrides = [*QUICK, "training.steps=30", "training.eval_interval=10", "optimizer.lr=1e-3"]
    stopped = train(
        load_config(REPO / "configs" / "smoke.yaml", overrides),
        checkpoint_dir=tmp_path,
        on_eval=lambda result, checkpoint: result.step == 10,
    )
    assert [r.step for r in stopped.history] == [10]
    checkpoint = load_checkpoint(tmp_path / "last")
    explored = load_config(
        REPO / "configs" / "smoke.yaml", [*overrides, "optimizer.lr=3e-4", "optimizer.weight_decay=1e-5"]
    )
    resumed = train(explored, resume=checkpoint)
    assert [r.step for r in resumed.history] == [10, 20, 30]
    assert resumed.history[0] == stopped.history[0]  # the inherited history
    assert resumed.history[1].lr == pytest.approx(3e-4)  # not the checkpoint's 1e-3
    # The Adam moments came from the checkpoint: a fresh optimizer at the new lr would train differently.
    fresh = train(explored, resume=None)
    assert resumed.history[1].loss != pytest.approx(fresh.history[1].loss, rel=1e-6)


def test_init_from_fine_tunes_and_reports_layers_that_do_not_fit(tmp_path: Path):
    pretrain = load_config(None, [*QUICK, "model.name=espcn", "training.steps=60", "training.eval_interval=60"])
    trained = train(pretrain, checkpoint_dir=tmp_path / "x3")
    scratch = load_config(None, [*QUICK, "model.name=espcn", "training.steps=1", "training.eval_interval=1"])
    fine_tuned = train(
        load_config(
            None,
            [
                *QUICK,
                "model.name=espcn",
                "training.steps=1",
                "training.eval_interval=1",
                "optimizer.lr=1e-6",
                f"training.init_from={tmp_path / 'x3' / 'best'}",
            ],
        )
    )
    assert fine_tuned.final.psnr > train(scratch).final.psnr + 1.0
    assert fine_tuned.final.psnr == pytest.approx(trained.best.psnr, abs=0.05)  # it starts where pretraining ended

    x2 = [
        *QUICK,
        "model.name=espcn",
        "model.scale=2",
        "training.steps=1",
        "training.eval_interval=1",
        f"training.init_from={tmp_path / 'x3' / 'best'}",
    ]
    with pytest.raises(ValueError, match=r"2 weight\(s\) do not fit") as error:
        train(load_config(None, x2))
    assert "to_subpixels.weight: checkpoint (9, 32, 3, 3), model (4, 32, 3, 3)" in str(error.value)
    assert "to_subpixels.bias: checkpoint (9,), model (4,)" in str(error.value)
    transferred = train(load_config(None, [*x2, "training.init_reinit=[to_subpixels]"]))
    assert transferred.final.step == 1


def test_pickle_files_are_refused_for_init_from(tmp_path: Path):
    torch.save(create_model("espcn", scale=3).state_dict(), tmp_path / "weights.pth")
    config = load_config(None, [*QUICK, "model.name=espcn", f"training.init_from={tmp_path / 'weights.pth'}"])
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        train(config)


def test_srresnet_then_srgan_end_to_end(tmp_path: Path, vgg_cache: Path):
    small = [
        *QUICK,
        "model.name=srresnet",
        "model.scale=4",
        "model.kwargs={num_blocks: 2}",
        "data.color=rgb",
        "data.lr_patch_size=8",
        "data.batch_size=4",
    ]
    train(load_config(None, [*small, "training.steps=4", "training.eval_interval=4"]), checkpoint_dir=tmp_path / "g")
    gan = load_config(
        None,
        [
            *small,
            "training.steps=4",
            "training.eval_interval=2",
            "loss.perceptual=vgg54",
            "loss.adversarial=bce",
            "loss.pixel_weight=0",
            "optimizer.lr=1e-4",
            f"training.init_from={tmp_path / 'g' / 'last'}",
        ],
    )
    result = train(gan, checkpoint_dir=tmp_path / "gan")
    assert set(result.final.losses) == {"perceptual", "adversarial", "discriminator"}
    assert set(result.final.vgg) == {"vgg22", "vgg54"} and result.final.vgg["vgg54"] > 0
    saved = load_checkpoint(tmp_path / "gan" / "last")
    assert saved.group("discriminator") and saved.group("d_optimizer") and saved.step == 4
    assert {"val_vgg54", "loss_adversarial", "loss_discriminator"} <= set(saved.metrics)


def test_the_preview_grid_shows_the_y_models_output_in_colour_tiles_of_at_least_192_px():
    config = load_config(REPO / "configs" / "smoke.yaml", ["training.device=cpu", "data.val_crop=48"])
    _, pairs = build_data(config, torch.device("cpu"), rank=0, world_size=1)
    torch.manual_seed(0)
    _, _, preview = evaluate(create_model("srcnn_915", scale=3), pairs, 3, eight_bit=True)
    # RGB tiles whose Y is the model's output, beside the LR's bicubic chroma.
    assert preview.sr.shape == preview.hr.shape == (3, 48, 48)
    bicubic_y = to_8bit(imresize(pairs[0].lr, scale=3).clamp(0, 1))  # what the bicubic tile's Y must be
    close = (rgb_to_y(preview.bicubic[None]) - bicubic_y).abs() < 2e-3
    assert close.float().mean() > 0.95  # all but pixels whose colour left the RGB gamut and was clipped
    assert (preview.hr[0] - preview.hr[2]).abs().max() > 0.1  # colour, not grey
    grid = preview_grid(preview)
    assert grid.width >= 4 * 192 and grid.height >= 192
    first_image = psnr(bicubic_y, pairs[0].hr, crop_border=3, y_channel=True).item()  # captions: its own PSNR
    assert grid_captions(preview)[:2] == ["LR (nearest)", f"bicubic {first_image:.2f} dB"]
    assert grid_captions(preview)[2] == f"SR {preview.sr_psnr:.2f} dB ({preview.sr_psnr - first_image:+.2f})"


def test_a_training_image_smaller_than_a_patch_is_named_or_skipped(tmp_path: Path, caplog):
    folder = tmp_path / "train"
    folder.mkdir()
    for name, crop in [
        ("big.png", skimage_photo("astronaut")[:, :90, :120]),
        ("tiny.png", skimage_photo("coffee")[:, :30, :40]),
    ]:
        Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy()).save(folder / name)
    # 11 px LR patches at x3: 33 px HR crops (no warps at augmentation strength 0).
    overrides = [*QUICK, f"data.train={folder}", "data.augment_strength=0"]
    with pytest.raises(BadImageError) as caught:
        build_data(load_config(REPO / "configs" / "smoke.yaml", overrides), torch.device("cpu"), 0, 1)
    assert "1 image(s) smaller than the 33px crop a 33px HR patch needs" in str(caught.value)
    assert "needs: tiny (40x30) (set data.skip_bad" in str(caught.value) and "big" not in str(caught.value)
    skipping = load_config(REPO / "configs" / "smoke.yaml", [*overrides, "data.skip_bad=true"])
    with caplog.at_level(logging.WARNING):
        sampler, _ = build_data(skipping, torch.device("cpu"), 0, 1)
    assert len(sampler.bank) == 1 and "tiny (40x30) is smaller than the 33px crop" in caplog.text
    with pytest.raises(BadImageError, match="no image is at least 99x99 pixels"):
        build_data(replace(skipping, data=replace(skipping.data, lr_patch_size=33)), torch.device("cpu"), 0, 1)


def test_the_weight_average_follows_the_model_early_and_reaches_its_decay_later():
    model, ema = nn.Linear(4, 4), nn.Linear(4, 4)
    nn.init.ones_(model.weight), nn.init.zeros_(ema.weight)
    ema_update = EmaUpdate.of(ema, model)
    for step in range(1, 31):
        ema_update(ema_decay_at(0.999, step))
    # A fixed 0.999 would be 1 - 0.999**30 = 3% of the way to the model after 30 steps.
    assert ema.weight.min().item() > 0.99
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 8990) == pytest.approx(0.999) and ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.9, 1000) == 0.9
