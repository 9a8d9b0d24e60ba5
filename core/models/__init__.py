"""Model architectures and a registry by name: ``create_model("resnet18", num_classes=10)``.

Importing this package imports every family module so that all names are registered.
"""

from core.models import mobilenetv2, preact_resnet, resnet, third_party, tiny, wide_resnet  # noqa: F401
from core.models.registry import create_model, list_models, register_model
from core.models.third_party import KNOWN_CHECKPOINTS, ThirdPartyCheckpoint

__all__ = [
    "KNOWN_CHECKPOINTS",
    "ThirdPartyCheckpoint",
    "create_model",
    "list_models",
    "register_model",
]
