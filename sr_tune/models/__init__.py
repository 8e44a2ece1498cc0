"""The SR model zoo. Importing this package registers every family."""

from sr_tune.models import edsr, espcn, fsrcnn, plain_cnn, srcnn, srresnet, vdsr, waifu2x  # noqa: F401
from sr_tune.models._layers import SUPPORTED_SCALES
from sr_tune.models.registry import create_model, get_builder, list_models, register_model
from sr_tune.models.srresnet import SRGANDiscriminator

__all__ = ["SUPPORTED_SCALES", "SRGANDiscriminator", "create_model", "get_builder", "list_models", "register_model"]
