"""Small transformers MoE models built from configs with seeded weights, shared by the engine tests."""

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)


def tiny_mixtral(seed: int = 0, dtype=torch.float32, layers: int = 2, experts: int = 8, top_k: int = 2):
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=128)
    return MixtralForCausalLM(cfg).to(dtype).eval()


def tiny_switch(seed: int = 0, dtype=torch.float32, experts: int = 8, capacity: int = 64):
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=96, d_model=32, d_ff=64, num_layers=4, num_decoder_layers=4,
                                   num_heads=4, d_kv=8, num_experts=experts, expert_capacity=capacity,
                                   encoder_sparse_step=2, decoder_sparse_step=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return SwitchTransformersForConditionalGeneration(cfg).to(dtype).eval()


def moe_layers(model) -> int:
    from moeoffload.hooks import discover

    return len(discover(model).layers)
