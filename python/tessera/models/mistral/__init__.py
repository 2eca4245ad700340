from tessera.models.mistral.args import MistralConfig
from tessera.models.mistral.model import Mistral

__all__ = ["Mistral", "MistralConfig"]
