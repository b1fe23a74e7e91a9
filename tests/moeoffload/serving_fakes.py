"""A fake decoder for the serving loop's tests: a tiny deterministic rule instead of a transformer.

Its next token depends on every key cached for the row (masked by the attention mask) and on the position, so a
KV buffer written to the wrong place, padding left visible, or a wrong position changes the tokens; `reference`
computes the same rule on the request alone. Each forward advances the test's ManualClock.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

VOCAB = 50


class FakeDecoder(nn.Module):
    def __init__(self, clock=None, step_s: float = 1.0, per_token_s: float = 0.01, fail_on=None):
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=1, hidden_size=2, num_attention_heads=1,
                                       num_key_value_heads=1)
        self.config.is_encoder_decoder = False
        self.generation_config = None
        self.anchor = nn.Parameter(torch.zeros(1))  # the loop reads the model's device from a parameter
        self.clock, self.step_s, self.per_token_s, self.fail_on = clock, step_s, per_token_s, fail_on
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache=True):
        self.calls += 1
        if self.fail_on is not None and self.fail_on(input_ids):
            raise RuntimeError("injected failure")
        if self.clock is not None:
            self.clock.advance(self.step_s + self.per_token_s * input_ids.numel())
        k = (input_ids.float() + 1)[:, None, :, None]  # [B, 1, S, 1]
        keys, _ = cache.update(k, k, 0)
        assert keys.shape[2] == attention_mask.shape[1], (keys.shape, attention_mask.shape)
        total = (keys[:, 0, :, 0] * attention_mask).sum(-1).long()  # [B]
        nxt = (total + position_ids[:, -1]) % VOCAB
        logits = torch.nn.functional.one_hot(nxt, VOCAB).float()[:, None, :].expand(-1, input_ids.shape[1], -1)
        return type("Out", (), {"logits": logits})()


def reference(prompt, max_new_tokens, eos=()):
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = (sum(t + 1 for t in seq) + len(seq) - 1) % VOCAB
        seq.append(token)
        out.append(token)
        if token in eos:
            break
    return out
