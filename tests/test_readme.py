"""The README's "Using it" block run as a new user would: every command, as written and in the order written,
in a fresh folder holding the project's configs and studies, with a fresh home folder holding two benchmark
folders and a photograph (scikit-image's). Each must exit 0. This is how the README stays true: a command
added to the block, or changed, fails here until this file knows it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sr_tune.data.sources import skimage_photo

from .conftest import REPO
from .services import start_ray_cluster

README_ADDRESS = "http://127.0.0.1:8265"
SHORT_SWEEP = ["budget.num_samples=2", "budget.max_steps=100", "scheduler.grace_period=100"]
# What this test adds to each command, to keep the suite short (the README says so below its block).
SHORTER: dict[str, list[str]] = {
    "sr-tune models": [],
    "sr-tune config --reference": [],
    "sr-tune config configs/smoke.yaml optimizer.lr=1e-4": [],
    "sr-tune tune search_spaces/quickstart.yaml": SHORT_SWEEP,
    "sr-tune tune search_spaces/quickstart.yaml --resume": SHORT_SWEEP,
    "sr-tune tune search_spaces/quickstart.yaml --restart --verbose": SHORT_SWEEP,
    "sr-tune tune search_spaces/srcnn_optimizer.yaml resources=local budget.num_samples=2 budget.max_steps=1000 "
    "scheduler.grace_period=500": [
        *SHORT_SWEEP,
        "training.eval_interval=100",
        "data.batch_size=16",
        "data.val_crop=96",
    ],
    "sr-tune tune search_spaces/photo_x2.yaml": [
        *SHORT_SWEEP,
        "budget.time_limit_s=0",
        "training.eval_interval=50",
        "data.val_crop=48",
    ],
    "sr-tune train configs/smoke.yaml": [],
    "sr-tune train configs/smoke.yaml --resume": [],
    "sr-tune train configs/smoke.yaml model.name=fsrcnn optimizer.lr=1e-3 training.steps=2000": ["training.steps=100"],
    "sr-tune train configs/vdsr_x3.yaml distributed.num_workers=2 training.steps=60": [
        "training.steps=2",
        "data.batch_size=8",
        "data.val_crop=48",
    ],
    "sr-tune eval --checkpoint runs/srcnn_915_x3/best --data ~/Set5 ~/Set14": [],
    "sr-tune eval --checkpoint runs/srcnn_915_x3/best --data ~/Set5 --float": [],
    "sr-tune upscale --checkpoint runs/srcnn_915_x3/best photo.jpg --out upscaled/ --tile 256": [],
    "sr-tune upscale --model models:/sr_tune-quickstart@best photo.jpg --out upscaled_best/": [],
    "sr-tune eval --model models:/sr_tune-quickstart@best --data ~/Set5": [],
    "sr-tune export --checkpoint runs/srcnn_915_x3/best srcnn.onnx": [],
    "sr-tune submit --address http://127.0.0.1:8265 --storage s3://bucket/sr_tune --tracking-uri "
    "https://mlflow.internal -- tune search_spaces/quickstart.yaml": ["--dry-run"],
    "sr-tune jobs list --address http://127.0.0.1:8265": [],
    "python -m sr_tune models": [],
}


def readme_commands() -> list[list[str]]:
    """The commands of the README's first bash block under "## Using it", as argument lists: continued lines
    joined, comments and the venv's activation left out."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Using it\n.*?^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "the README has no bash block under '## Using it'"
    joined = block.group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [command for command in commands if command and command[0] != "."]


def test_the_readme_block_is_the_one_this_test_knows():
    assert [" ".join(command) for command in readme_commands()] == list(SHORTER)


def _fresh_folder(root: Path) -> tuple[Path, Path]:
    work, home = root / "project", root / "home"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(REPO / "search_spaces", work / "search_spaces")
    for folder, names in (("Set5", ("astronaut", "coffee")), ("Set14", ("chelsea", "rocket"))):
        (home / folder).mkdir(parents=True)
        for name in names:
            Image.fromarray(skimage_photo(name).permute(1, 2, 0).numpy()).save(home / folder / f"{name}.png")
    Image.fromarray(skimage_photo("coffee").permute(1, 2, 0).numpy()).save(work / "photo.jpg", quality=90)
    return work, home


def _program(command: list[str]) -> list[str]:
    """``sr-tune`` as the installed script beside this Python (the venv's), ``python`` as this Python."""
    script = Path(sys.executable).parent / "sr-tune"
    if command[0] == "sr-tune":
        return [str(script), *command[1:]] if script.is_file() else [sys.executable, "-m", "sr_tune", *command[1:]]
    return [sys.executable, *command[1:]]


@pytest.mark.ray
def test_every_command_of_the_readme_runs_in_order_in_a_fresh_folder(tmp_path: Path):
    work, home = _fresh_folder(tmp_path)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "SR_TUNE_"))}
    environment.update(HOME=str(home), PYTHONUNBUFFERED="1")
    cluster = None
    try:
        for command in readme_commands():
            written = " ".join(command)
            arguments = [str(home) + part[1:] if part.startswith("~/") else part for part in command]
            if README_ADDRESS in arguments and command[1] == "jobs":  # a real head, started only for it
                cluster = start_ray_cluster(tmp_path / "cluster", {}, second_node=False)
                arguments = [cluster.address if part == README_ADDRESS else part for part in arguments]
                environment["RAY_AUTH_TOKEN"] = cluster.token
            cut = arguments.index("--") if "--" in arguments else len(arguments)  # submit's job comes last
            started = time.monotonic()
            done = subprocess.run(
                [*_program(arguments[:cut]), *SHORTER[written], *arguments[cut:]],
                cwd=work,
                env=environment,
                capture_output=True,
                text=True,
                timeout=600,
            )
            output = done.stdout + done.stderr
            print(f"{time.monotonic() - started:6.1f} s  {written}")  # where the suite's time goes (-s shows it)
            assert done.returncode == 0 and "Traceback" not in output, f"{written}\n{output[-4000:]}"
            if command[1:3] == ["train", "configs/smoke.yaml"] and "--resume" in command:
                assert "finished" in output, output[-2000:]
    finally:
        if cluster is not None:
            cluster.stop()
    assert sorted(path.name for path in (work / "upscaled").iterdir()) == ["photo_x3.png"]
    assert (work / "runs" / "srcnn_915_x3" / "best").is_dir() and (work / "mlflow.db").is_file()
