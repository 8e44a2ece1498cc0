"""The model a run logs and a sweep registers: an MLflow pyfunc that takes image files and returns them
upscaled, as ``sr-tune upscale`` does (same tiles, same 8-bit PNG bytes).

It is a models-from-code model: the code is ``mlflow_model.py`` (which only names ``ImageUpscaler``), the
artifact is the checkpoint folder (safetensors weights and the JSON config), and sr_tune's own source travels
with it as code, so nothing is pickled and any Python with sr_tune's dependencies serves it. A request is a
table with one column ``image``: each row an image file (PNG, JPEG, ... any size, 8-bit) in base64; the answer
has the column ``image`` too, each row the upscaled PNG in base64.

``resolve_model`` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN/PATH`` back into the
checkpoint folder, for ``upscale``, ``eval`` and ``export``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from sr_tune.checkpoint import META_FILE, Checkpoint, load_checkpoint, save_checkpoint
from sr_tune.errors import InputError

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CHECKPOINT_ARTIFACT = "checkpoint"
COLUMN = "image"
# What serving needs beyond the Python standard library (sr_tune's own code travels with the model).
REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "pyyaml", "pandas", "mlflow")


class ImageUpscaler(PythonModel):
    """Base64 image files in, base64 upscaled PNGs out, one row each."""

    def load_context(self, context: Any) -> None:
        from sr_tune.inference import Upscaler

        self.upscaler = Upscaler.from_checkpoint(load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from sr_tune.data.sources import decode_image
        from sr_tune.inference import png_bytes

        rows = []
        for index, encoded in enumerate(model_input[COLUMN]):
            image = decode_image(_base64_bytes(encoded, index), f"row {index} of column {COLUMN!r}")
            rows.append(base64.b64encode(png_bytes(self.upscaler.rgb(image))).decode("ascii"))
        return pd.DataFrame({COLUMN: rows})


def _base64_bytes(encoded: object, index: int) -> bytes:
    if isinstance(encoded, bytes):  # a binary column: already decoded
        return encoded
    try:
        return base64.b64decode(str(encoded), validate=True)
    except ValueError:
        raise InputError(
            f"row {index} of column {COLUMN!r}: not base64 (an image file in base64 is expected)"
        ) from None


def image_request(files: list[bytes]) -> pd.DataFrame:
    """The model's input for image files' bytes."""
    return pd.DataFrame({COLUMN: [base64.b64encode(data).decode("ascii") for data in files]})


def upscaled_pngs(answer: pd.DataFrame) -> list[bytes]:
    """The PNG files of the model's answer."""
    return [base64.b64decode(encoded) for encoded in answer[COLUMN]]


@contextlib.contextmanager
def process_store(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's process-wide store (and experiment) for one call that reads them (logging a model, resolving a
    ``models:/`` URI, which ignores the store it is given in places); then the store and the variables
    (``set_tracking_uri`` rewrites ``MLFLOW_TRACKING_URI``) are put back exactly as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    variables = {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar per download, on a command's console
        **({"MLFLOW_EXPERIMENT_ID": experiment_id} if experiment_id else {}),
    }
    saved_uri, saved = utils._tracking_uri, {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", COLUMN)]),  # base64 image file of any size
        outputs=Schema([ColSpec("string", COLUMN)]),  # base64 PNG, the size times the scale
    )


def _example_image() -> bytes:
    """A real photograph (a corner of scikit-image's astronaut), small: the example is run when logged."""
    from sr_tune.data.sources import skimage_photo
    from sr_tune.inference import png_bytes

    return png_bytes(skimage_photo("astronaut")[:, 40:72, 180:228].contiguous())


def metadata(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a user of the registered model needs to know, in its MLmodel file."""
    config = checkpoint.config
    return {
        "sr_tune_model": config.model.name,
        "scale": config.model.scale,
        "color": config.data.color,
        "step": checkpoint.step,
        "input": "column 'image': image files (PNG, JPEG, ...; 8-bit, any size) in base64",
        "output": f"column 'image': the images upscaled x{config.model.scale}, PNG in base64",
        "luma_only": config.data.color == "y",  # Y models: the network on luma, chroma by bicubic
    }


@contextlib.contextmanager
def _inference_checkpoint(checkpoint: Checkpoint) -> Iterator[Path]:
    """The checkpoint as inference needs it: the weights it upscales with (the EMA's when kept) and its
    config, step and metrics; no optimizer or discriminator state, no history."""
    with tempfile.TemporaryDirectory(prefix="sr_tune-model-") as staging:
        target = Path(staging) / CHECKPOINT_ARTIFACT
        save_checkpoint(
            target,
            model=checkpoint.build_model(),
            config=checkpoint.config,
            step=checkpoint.step,
            metrics=checkpoint.metrics,
        )
        yield target


@contextlib.contextmanager
def _source_copy() -> Iterator[Path]:
    """sr_tune's source without byte-code caches: the code that travels with the model."""
    with tempfile.TemporaryDirectory(prefix="sr_tune-code-") as staging:
        target = Path(staging) / "sr_tune"
        shutil.copytree(Path(__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield target


def log_image_model(run_id: str, checkpoint_folder: str | Path, *, registered_name: str | None = None) -> Any:
    """Log the checkpoint in ``checkpoint_folder`` as run ``run_id``'s model ``model`` (registered as
    ``registered_name`` when given); MLflow's process-wide store must be the run's. Returns MLflow's
    ``ModelInfo``."""
    import mlflow.pyfunc
    from mlflow.models import Model

    checkpoint = load_checkpoint(checkpoint_folder)
    with _inference_checkpoint(checkpoint) as artifact, _source_copy() as code:
        return Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(artifact)},
            code_paths=[str(code)],
            signature=_signature(),
            input_example=image_request([_example_image()]),
            pip_requirements=list(REQUIREMENTS),
            metadata=metadata(checkpoint),
            registered_model_name=registered_name,
        )


@contextlib.contextmanager
def resolve_model(uri: str, tracking_uri: str) -> Iterator[Path]:
    """The checkpoint folder of the model at ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/model``, or ``runs:/RUN_ID/best_checkpoint``), downloaded from the store at
    ``tracking_uri`` into a folder removed afterwards. An unknown name, alias, version or run is an
    ``InputError`` of one line."""
    from mlflow.exceptions import MlflowException

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix) :]).is_file():
        raise InputError(
            f"{uri}: no MLflow store at {tracking_uri[len(prefix) :]} (name the store that holds the model with "
            f"--tracking-uri or MLFLOW_TRACKING_URI)"
        )
    with tempfile.TemporaryDirectory(prefix="sr_tune-model-") as folder:
        try:
            with process_store(tracking_uri):
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        uri, dst_path=folder, tracking_uri=tracking_uri, registry_uri=tracking_uri
                    )
                )
        except MlflowException as error:
            message = str(error.message).splitlines()[0] if error.message else type(error).__name__
            raise InputError(f"{uri}: not found in the MLflow store {tracking_uri} ({message})") from None
        for candidate in (local / "artifacts" / CHECKPOINT_ARTIFACT, local):
            if (candidate / META_FILE).is_file():
                yield candidate
                return
        raise InputError(f"{uri}: neither an sr_tune model nor a checkpoint folder (no {META_FILE} in it)")
