"""Recurrent Memory Transformers (RMT) as a Hugging Face Transformers plugin.

Importing this package registers the `rmt` model type with the Auto classes and marks the classes
so that `save_pretrained` writes their code and `auto_map` beside the weights (loadable with
`trust_remote_code=True` where this package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_rmt import RMTConfig
from .memory import TokenMemory
from .modeling_rmt import (
    RMTForSequenceClassification,
    RMTModel,
    RMTModelOutput,
    RMTPreTrainedModel,
    RMTSequenceClassifierOutput,
)

AutoConfig.register(RMTConfig.model_type, RMTConfig, exist_ok=True)
AutoModel.register(RMTConfig, RMTModel, exist_ok=True)
AutoModelForSequenceClassification.register(RMTConfig, RMTForSequenceClassification, exist_ok=True)
RMTConfig.register_for_auto_class()
RMTModel.register_for_auto_class("AutoModel")
RMTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"
__all__ = [
    "RMTConfig",
    "RMTModel",
    "RMTForSequenceClassification",
    "RMTModelOutput",
    "RMTPreTrainedModel",
    "RMTSequenceClassifierOutput",
    "TokenMemory",
]
