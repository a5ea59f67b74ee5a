"""fimlora: task-informed per-module LoRA ranks from the empirical Fisher of LoRA-B.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=[...]))
    allocation = fimlora.apply_fim_ranks(model, train_dataloader)   # 8 backward passes
    # train `model` as usual: it is a standard PEFT LoRA model with rank_pattern
"""

from .allocation import RankAllocation
from .api import allocation_from_scores, apply_fim_ranks, compute_allocation, random_allocation
from .config import FimConfig
from .export import compute_export, export_adapter
from .fisher import FisherResult, aggregate_fisher, compute_fisher, compute_scores
from .lr import LrRecommendation, compute_lr_recommendation, learning_rate_from_statistic
from .modules import check_pattern_keys, lora_modules, pattern_matches
from .resize import apply_allocation, apply_resized_lora_a, lora_a_weights, lora_config_for_allocation
from .waterfill import allocate_ranks, random_scores

__version__ = "0.1.0"

__all__ = [
    "FimConfig",
    "FisherResult",
    "LrRecommendation",
    "RankAllocation",
    "aggregate_fisher",
    "allocate_ranks",
    "allocation_from_scores",
    "apply_allocation",
    "apply_fim_ranks",
    "apply_resized_lora_a",
    "check_pattern_keys",
    "compute_allocation",
    "compute_export",
    "compute_fisher",
    "compute_lr_recommendation",
    "compute_scores",
    "export_adapter",
    "learning_rate_from_statistic",
    "lora_a_weights",
    "lora_config_for_allocation",
    "lora_modules",
    "pattern_matches",
    "random_allocation",
    "random_scores",
]
