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


def _causal_lm(config_cls, model_cls, seed, dtype, **kw):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_cls(config_cls(**{**common, **kw})).to(dtype).eval()


def tiny_qwen2_moe(seed: int = 0, dtype=torch.float32, experts: int = 8, top_k: int = 2):
    """Qwen1.5-MoE shape: routed experts plus a sigmoid-gated shared expert that stays resident."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return _causal_lm(Qwen2MoeConfig, Qwen2MoeForCausalLM, seed, dtype, intermediate_size=96,
                      moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=experts,
                      num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)


def tiny_qwen3_moe(seed: int = 0, dtype=torch.float32, experts: int = 8, top_k: int = 2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _causal_lm(Qwen3MoeConfig, Qwen3MoeForCausalLM, seed, dtype, head_dim=16, intermediate_size=96,
                      moe_intermediate_size=48, num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True)


def tiny_olmoe(seed: int = 0, dtype=torch.float32, experts: int = 8, top_k: int = 2):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return _causal_lm(OlmoeConfig, OlmoeForCausalLM, seed, dtype, intermediate_size=48, num_experts=experts,
                      num_experts_per_tok=top_k)


def tiny_deepseek_v2(seed: int = 0, dtype=torch.float32, experts: int = 8, top_k: int = 2,
                     topk_method: str = "greedy"):
    """DeepSeek-V2(-Lite) shape: layer 0 dense (first_k_dense_replace), then MoE layers with 2 shared experts.
    topk_method "greedy" is V2-Lite's router; "group_limited_greedy" (4 groups, top 2) is full V2's."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    grouped = topk_method == "group_limited_greedy"
    return _causal_lm(DeepseekV2Config, DeepseekV2ForCausalLM, seed, dtype, num_hidden_layers=3, num_key_value_heads=4,
                      intermediate_size=96, moe_intermediate_size=32, n_routed_experts=experts, n_shared_experts=2,
                      num_experts_per_tok=top_k, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, topk_method=topk_method,
                      n_group=4 if grouped else None, topk_group=2 if grouped else None, routed_scaling_factor=1.5)


def tiny_gpt_oss(seed: int = 0, dtype=torch.float32, experts: int = 8, top_k: int = 2):
    """GPT-OSS shape: transposed, biased experts with interleaved gate/up. transformers initialises the biases to
    zero and the weights too small to reach the clamp; seeded values here exercise both."""
    from transformers import GptOssConfig, GptOssForCausalLM

    model = _causal_lm(GptOssConfig, GptOssForCausalLM, seed, torch.float32, head_dim=16, intermediate_size=48,
                       num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       layer_types=["sliding_attention", "full_attention"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for p, std in ((ex.gate_up_proj, 0.5), (ex.gate_up_proj_bias, 0.5), (ex.down_proj, 0.1),
                           (ex.down_proj_bias, 0.1)):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(dtype)


def moe_layers(model) -> int:
    from moeoffload.hooks import discover

    return len(discover(model).layers)
