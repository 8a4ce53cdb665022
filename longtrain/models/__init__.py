"""Model definitions (Llama-family decoder), the size registry and Hugging Face converters."""
from longtrain.models.args import ModelArgs
from longtrain.models.hf import args_from_hf_config, from_hf, hf_config_from_args, load_hf_weights, to_hf
from longtrain.models.llama import Transformer
from longtrain.models.registry import MODEL_REGISTRY, get_model_args

__all__ = ["ModelArgs", "Transformer", "MODEL_REGISTRY", "get_model_args", "from_hf", "to_hf", "args_from_hf_config",
           "hf_config_from_args", "load_hf_weights"]
