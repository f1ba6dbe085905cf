"""Recurrent Memory Transformers (RMT) as a Hugging Face Transformers plugin.

Importing this package registers the `rmt` model type with the Auto classes and marks the classes
so that `save_pretrained` writes their code and `auto_map` beside the weights (loadable with
`trust_remote_code=True` where this package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_rmt import RMTConfig
from .generation_cache import RMTGenerationCache
from .memory import TokenMemory
from .modeling_rmt import (
    RMTCausalLMOutput,
    RMTForCausalLM,
    RMTForSequenceClassification,
    RMTModel,
    RMTModelOutput,
    RMTSequenceClassifierOutput,
)
from .pretrained import RMTPreTrainedModel

AutoConfig.register(RMTConfig.model_type, RMTConfig, exist_ok=True)
AutoModel.register(RMTConfig, RMTModel, exist_ok=True)
AutoModelForSequenceClassification.register(RMTConfig, RMTForSequenceClassification, exist_ok=True)
AutoModelForCausalLM.register(RMTConfig, RMTForCausalLM, exist_ok=True)
RMTConfig.register_for_auto_class()
RMTModel.register_for_auto_class("AutoModel")
RMTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
RMTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "RMTConfig",
    "RMTModel",
    "RMTForSequenceClassification",
    "RMTForCausalLM",
    "RMTCausalLMOutput",
    "RMTGenerationCache",
    "RMTModelOutput",
    "RMTPreTrainedModel",
    "RMTSequenceClassifierOutput",
    "TokenMemory",
]
