"""The MedTVT model as Hugging Face classes: config, model, processor, projector, stages, file format.

Importing :mod:`medtvt_core` registers ``MedTVTConfig`` with ``AutoConfig`` and the model with
``AutoModel``, so ``AutoModel.from_pretrained(<run>/<stage>/final)`` returns the trained model.
"""

from .configuration import FORMAT_VERSION, MedTVTConfig
from .modeling import MedTVTForConditionalGeneration, MedTVTOutput, MedTVTPreTrainedModel
from .processing import MedTVTProcessor

__all__ = ["FORMAT_VERSION", "MedTVTConfig", "MedTVTForConditionalGeneration", "MedTVTOutput",
           "MedTVTPreTrainedModel", "MedTVTProcessor", "register_auto_classes"]


def register_auto_classes() -> None:
    """``AutoConfig``/``AutoModel`` know ``model_type="medtvt"`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(MedTVTConfig.model_type, MedTVTConfig)
    except ValueError:  # already registered (a second import path or a reload)
        pass
    try:
        AutoModel.register(MedTVTConfig, MedTVTForConditionalGeneration)
    except ValueError:
        pass


register_auto_classes()
