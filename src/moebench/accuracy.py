"""Accuracy of a policy's outputs against the reference (resident) run on the same inputs.

Per case: perplexity and next-token accuracy, teacher-forced on the same text for both runs; task accuracy when
the workload names a multiple-choice JSONL file; greedy-token agreement of the free-running generations; mean
KL(reference || policy) of the next-token distributions on the teacher-forced text. The accuracy drop is
reference metric - policy metric, where the metric is task accuracy when a task is given, else next-token accuracy.

Which text: windows of held-out corpus text when the model has a tokenizer (a language model; the trained
kjv-moe). Without one (synthetic weights), the reference's own greedy continuations of the timed prompts: text
the reference finds likely, so a policy that changes the computation shows up as lost accuracy there; the record
says which text was used. Encoder-decoder models (Switch) are scored on the decoder side of the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) of `targets` [...] under `logits` [..., V]."""
    nll = -log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll.double().mean().exp())


def next_token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).double().mean())


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref || p) in nats; 0 for identical logits, never negative."""
    lp_ref, lp = log_probs(ref_logits), log_probs(logits)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    return max(0.0, float(kl.double().mean()))


def decision_margin(logits: torch.Tensor) -> float:
    """Median over positions of the gap between the first and second most probable tokens' probabilities: how far
    a model's greedy choices are from ties. A trained model's is tenths (models/kjv-moe: 0.17 in the suites'
    records); a model with seeded random weights has near-uniform next-token distributions (switch-base-8, 32k
    vocabulary: 8.4e-8)."""
    top = log_probs(logits).exp().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).double().median())


def token_agreement(ref_tokens: torch.Tensor, tokens: torch.Tensor) -> float:
    if ref_tokens.shape != tokens.shape:
        raise ValueError(f"token shapes differ: reference {tuple(ref_tokens.shape)}, policy {tuple(tokens.shape)}")
    return float((ref_tokens == tokens).double().mean())


@dataclass
class EvalText:
    """Teacher-forced text: the model reads `context` [N, C] (the encoder input for encoder-decoder models) and
    is scored on predicting every token of `target` [N, T]."""

    context: torch.Tensor
    target: torch.Tensor
    description: str


def heldout_text(model, tokenizer, sequences: int, length: int) -> EvalText:
    """`sequences` windows of `length` held-out tokens, evenly spaced over the held-out text (deterministic)."""
    from .workload import heldout_ids

    ids = heldout_ids(tokenizer)
    if ids.numel() < sequences * length:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than {sequences} x {length}")
    stride = ids.numel() // sequences
    windows = torch.stack([ids[i * stride:i * stride + length] for i in range(sequences)])
    split = length // 2 if model.config.is_encoder_decoder else 1
    return EvalText(windows[:, :split], windows[:, split:],
                    f"held-out corpus text, {sequences} x {length} tokens (moebench.corpus)")


def continuation_text(prompts: list[torch.Tensor], tokens: torch.Tensor) -> EvalText:
    """The reference's greedy continuations [N, new_tokens] of its timed prompts (concatenated in order)."""
    context = torch.cat([p.cpu() for p in prompts])
    return EvalText(context, tokens.cpu(), f"reference greedy continuations of the timed prompts "
                                           f"({tokens.shape[0]} x {tokens.shape[1]} tokens; model has no tokenizer)")


@torch.no_grad()
def teacher_forced_logits(model, text: EvalText, device, batch_size: int = 8) -> torch.Tensor:
    """Logits [N, T, V] (float32, on the CPU) predicting each token of `text.target`."""
    out = []
    for start in range(0, text.context.shape[0], batch_size):
        ctx = text.context[start:start + batch_size].to(device)
        tgt = text.target[start:start + batch_size].to(device)
        if model.config.is_encoder_decoder:
            begin = torch.full_like(tgt[:, :1], model.config.decoder_start_token_id)
            logits = model(input_ids=ctx, attention_mask=torch.ones_like(ctx),
                           decoder_input_ids=torch.cat([begin, tgt[:, :-1]], dim=1)).logits
        else:
            ids = torch.cat([ctx, tgt], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, ctx.shape[1] - 1:-1]
        out.append(logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def choice_scores(model, tokenizer, item, device) -> list[float]:
    """Sum of log-probabilities of each choice's tokens as the continuation of the prompt."""
    prompt = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in item.choices:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not prompt or not cont:
            raise ValueError(f"task item {item.prompt[:30]!r}: prompt and every choice must encode to >= 1 token")
        text = EvalText(torch.tensor([prompt]), torch.tensor([cont]), "task")
        logits = teacher_forced_logits(model, text, device)
        scores.append(float(log_probs(logits[0]).gather(-1, text.target[0].unsqueeze(-1)).sum()))
    return scores


def task_accuracy(model, tokenizer, items, device) -> float:
    """Share of items whose highest-scoring choice is the answer."""
    if tokenizer is None:
        raise ValueError("a JSONL task needs a model with a tokenizer; synthetic-weight models have none")
    right = 0
    for item in items:
        scores = choice_scores(model, tokenizer, item, device)
        right += int(max(range(len(scores)), key=scores.__getitem__) == item.answer)
    return right / len(items)


@dataclass
class Evaluation:
    """One run's teacher-forced results on an EvalText (and task, when given)."""

    text: EvalText
    logits: torch.Tensor
    perplexity: float
    next_token_accuracy: float
    task_accuracy: float | None = None


def evaluate(model, text: EvalText, device, tokenizer=None, task=None) -> Evaluation:
    logits = teacher_forced_logits(model, text, device)
    acc = task_accuracy(model, tokenizer, task, device) if task else None
    return Evaluation(text, logits, perplexity(logits, text.target), next_token_accuracy(logits, text.target), acc)


def compare(ref: Evaluation, ev: Evaluation, ref_tokens: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The accuracy fields of a case's record: reference and policy metrics, the drop, agreement and KL."""
    use_task = False
    ref_metric, metric = ref.next_token_accuracy, ev.next_token_accuracy
    if ref.task_accuracy is not None and ev.task_accuracy is not None:  # both ran the same task (evaluate's task=)
        use_task, ref_metric, metric = True, ref.task_accuracy, ev.task_accuracy
    return {
        "accuracy_metric": "task accuracy" if use_task else "next-token accuracy",
        "accuracy_drop": ref_metric - metric,
        "eval_text": ref.text.description,
        "perplexity": ev.perplexity,
        "reference_perplexity": ref.perplexity,
        "next_token_accuracy": ev.next_token_accuracy,
        "reference_next_token_accuracy": ref.next_token_accuracy,
        "task_accuracy": ev.task_accuracy,
        "reference_task_accuracy": ref.task_accuracy,
        "token_agreement": token_agreement(ref_tokens, tokens),
        "kl_divergence": mean_kl(ref.logits, ev.logits),
        "reference_decision_margin": decision_margin(ref.logits),
    }
