"""sr_tune: Ray-distributed training and hyperparameter tuning for single-image super-resolution."""

__version__ = "0.1.0"
