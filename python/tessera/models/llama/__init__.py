from tessera.models.llama.model import Llama, LlamaConfig
from tessera.models.llama.parallelize import parallelize

__all__ = ["Llama", "LlamaConfig", "parallelize"]
