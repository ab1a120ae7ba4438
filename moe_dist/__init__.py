"""moe_dist: expert-parallel, routing-aware LoRA fine-tuning of Hugging Face MoE models on DeepSpeed.

The public API: `AdapterPlan` (which adapters, at what rank), `ExpertPlacement` (which rank
owns which expert), `load_model` (sharded from safetensors) / `convert_model` (an in-memory
HF model), and `adapter_params` (every adapter tensor by logical key).
"""

from moe_dist.adapters.lora import LoRAConfig
from moe_dist.models.convert import adapter_grads, adapter_params, convert_model, trainable_params
from moe_dist.models.loading import load_model
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan

__all__ = ["AdapterPlan", "ExpertPlacement", "LoRAConfig", "adapter_grads", "adapter_params", "convert_model", "load_model", "trainable_params"]
