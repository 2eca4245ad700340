from tessera.models.llama.args import LlamaConfig, RopeScaling
from tessera.models.llama.model import KVCache, Llama
from tessera.models.llama.parallelize import parallelize

__all__ = ["KVCache", "Llama", "LlamaConfig", "RopeScaling", "parallelize"]
