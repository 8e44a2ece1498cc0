"""The code of the pyfunc model sr_tune logs (MLflow's models from code): MLflow runs this file when it loads
the model. The model itself is ``sr_tune.served_model.ImageUpscaler``; its weights are the logged checkpoint."""

import mlflow

from sr_tune.served_model import ImageUpscaler

mlflow.models.set_model(ImageUpscaler())
