"""Parameter-efficient fine-tuning: LoRA adapters on tessera's Llama/Mistral, sharded with their base weights,
exported as a peft adapter directory or merged into a Hugging Face checkpoint.

    model = tessera.models.load_hf(path)
    tessera.peft.apply_lora(model, tessera.peft.LoRAConfig(rank=8, alpha=16.0))
    parallelize(model)                          # frozen base + adapters share each block's unit
    opt = tessera.optim.AdamW(model.parameters())   # state for the adapters only
    ...
    tessera.peft.save_adapter(model, "adapter/", base_model_name_or_path=path)
"""

from tessera.peft.export import adapter_config, save_adapter
from tessera.peft.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora

__all__ = ["LoRAConfig", "LoRALinear", "adapter_config", "apply_lora", "lora_modules", "merge_lora", "save_adapter"]
