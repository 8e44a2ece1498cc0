"""Delta-STN as a training run (``delta_stn:`` in a config): the engine's step, its checkpoints (plain models),
resume on the same hyperparameter trajectory, and ranks agreeing on the hyperparameters under DDP."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import load_config
from sr_tune.data.sources import skimage_photo
from sr_tune.engine import build_data, evaluate, train
from sr_tune.fields import ConfigError
from sr_tune.inference import Upscaler
from sr_tune.models import create_model
from sr_tune.study import load_study
from sr_tune.visualize import curves_figure

from .conftest import REPO, Interrupted, stopped_at

TUNED = [
    "training.device=cpu",
    "data.val_crop=48",
    "model.name=fsrcnn",
    "model.scale=2",
    "data.batch_size=8",
    "training.steps=40",
    "training.eval_interval=10",
    "optimizer.ema_decay=0.9",
    "optimizer.schedule=cosine",
    "delta_stn.enabled=true",
    "delta_stn.l2=[1e-4, 1e-8, 1e-1]",
    "delta_stn.augment_strength=[0.3, 0.0, 1.0]",
    "delta_stn.pixel_mix={l1: [0.5, 0.01, 10]}",
    "delta_stn.warmup_steps=6",
    "delta_stn.interval=2",
    "delta_stn.hyper_lr=0.05",
]
START = {"l2": 1e-4, "augment_strength": 0.3, "mix_l1": 0.5}


def test_a_delta_stn_run_tunes_its_hyperparameters_and_saves_plain_models(tmp_path: Path):
    config = load_config(None, TUNED)
    history = train(config, checkpoint_dir=tmp_path).history
    assert [r.step for r in history] == [10, 20, 30, 40]
    final = history[-1].hyper
    assert set(final) == {*START, *(f"{name}_scale" for name in START)}
    for name, start in START.items():  # 17 hyperparameter steps at lr 0.05 moved every value off its start
        assert final[name] != pytest.approx(start, rel=1e-3), name
    assert 1e-8 <= final["l2"] <= 1e-1 and 0.0 < final["augment_strength"] < 1.0
    assert history[-1].metrics()["hp_mix_l1"] == final["mix_l1"]  # the curves MLflow and Tune receive
    figure = curves_figure(history)  # the run's curves.png: loss, PSNR, then each trajectory
    assert [axis.get_title() for axis in figure.axes[2:]] == [f"Delta-STN: {name}" for name in START]
    assert list(figure.axes[4].lines[0].get_ydata()) == [r.hyper["mix_l1"] for r in history]

    plain_keys = set(create_model("fsrcnn", scale=2, in_channels=1).state_dict())
    for name in ("best", "last"):
        checkpoint = load_checkpoint(tmp_path / name)
        assert set(checkpoint.group("model")) == plain_keys  # the plain network's own keys
    # The best checkpoint is the model that was evaluated: rebuilt as a plain FSRCNN it scores the same.
    best = load_checkpoint(tmp_path / "best")
    _, pairs = build_data(config, torch.device("cpu"), rank=0, world_size=1)
    scores, _, _ = evaluate(best.build_model(), pairs, 2, eight_bit=True)
    assert scores["psnr"] == pytest.approx(max(r.psnr for r in history), abs=1e-6)
    photo = skimage_photo("astronaut")[:, :40, :52]
    assert Upscaler.from_checkpoint(best).rgb(photo).shape == (3, 80, 104)


def test_a_harmful_l2_is_tuned_down_and_the_perturbation_scales_stop_at_their_bound():
    # lambda 3e-2 on ||w||^2 (FSRCNN: ~10) outweighs the L1 loss (~0.1): the hypergradient points down every step.
    overrides = [*TUNED, "delta_stn.l2=[3e-2, 1e-8, 1e-1]", "delta_stn.max_perturbation=0.8"]
    history = train(load_config(None, [*overrides, "training.steps=120", "training.eval_interval=60"])).history
    final = history[-1].hyper
    assert final["l2"] < 3e-2 / 3  # 50 hyperparameter steps (measured: 8.0e-3)
    scales = [final[f"{name}_scale"] for name in START]
    assert max(scales) == pytest.approx(0.8) and min(scales) > 0.5  # the entropy bonus pushes every scale up


def test_a_resumed_delta_stn_run_continues_the_same_hyperparameter_trajectory(tmp_path: Path):
    config = load_config(None, TUNED)
    uninterrupted = train(config).history

    with pytest.raises(Interrupted):
        train(config, on_eval=stopped_at(20), checkpoint_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "last")
    assert checkpoint.group("response") and checkpoint.group("hyper") and checkpoint.optimizers["hyper_optimizer"]
    resumed = train(config, resume=checkpoint).history
    assert [r.hyper for r in resumed] == [r.hyper for r in uninterrupted]
    assert [r.loss for r in resumed] == [r.loss for r in uninterrupted]
    assert [r.psnr for r in resumed] == [r.psnr for r in uninterrupted]


def _rank(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        history = train(load_config(None, [*TUNED, "training.steps=20"]), rank=rank, world_size=2).history
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps([r.hyper for r in history]))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_hyperparameters_at_every_step(tmp_path: Path):
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # bit for bit: averaged gradients, the same steps on every rank
    assert ranks[0][-1]["mix_l1"] != pytest.approx(0.5, rel=1e-3)


def test_what_delta_stn_cannot_combine_with_is_refused_all_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(
            None,
            [
                "delta_stn.enabled=true",
                "delta_stn.l2=[1e-4, 1e-8, 1e-1]",
                "optimizer.weight_decay=1e-4",
                "delta_stn.augment_strength=[0.3, 0.0, 1.0]",
                "data.augment_strength=0.5",
                "delta_stn.pixel_mix={mse: [0.5, 0.01, 10]}",
                "loss.adversarial=bce",
                "model.name=srresnet",
            ],
        )
    problems = "\n".join(error.value.problems)
    for expected in (
        "set optimizer.weight_decay to 0",
        "set data.augment_strength to 0",
        "'mse' is loss.pixel",
        "pixel-loss runs only",
        "srresnet has BatchNorm",
    ):
        assert expected in problems
    with pytest.raises(ConfigError, match="delta_stn.l2: .*low < initial < high"):
        load_config(None, ["delta_stn.enabled=true", "delta_stn.l2=[1e-1, 1e-8, 1e-2]"])
    with pytest.raises(ConfigError, match="nothing to tune"):
        load_config(None, ["delta_stn.enabled=true"])


def test_the_shipped_study_tunes_inside_each_trial_and_refuses_searching_what_delta_stn_tunes(tmp_path: Path):
    study = load_study(REPO / "search_spaces" / "delta_stn.yaml")
    config = study.trial_config({"optimizer.lr": 1e-3, "data.batch_size": 32})
    assert config.delta_stn.enabled and config.delta_stn.tuned == ("l2", "augment_strength", "mix_mse")
    text = (REPO / "search_spaces" / "delta_stn.yaml").read_text()
    searching = text.replace("base: ../configs", f"base: {REPO / 'configs'}").replace(
        "  data.batch_size: {type: choice, values: [16, 32]}",
        "  data.augment_strength: {type: uniform, low: 0.0, high: 1.0}",
    )
    (tmp_path / "study.yaml").write_text(searching)
    with pytest.raises(ConfigError, match="search.data.augment_strength = 1.0: delta_stn.augment_strength: tunes"):
        load_study(tmp_path / "study.yaml")
