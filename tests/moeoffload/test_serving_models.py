"""The serving loop on tiny transformers MoE models, offloaded: each request's greedy tokens are those
`model.generate()` gives it alone (fp32 on a CPU, where padding and batch mates change no bit of a row), under
first-come and under ExpertFlow's scheduling, which an `expertflow` policy now gets by itself."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeoffload
from moeoffload import predictors as P
from moeoffload.predictors.expertflow import ExpertFlowPredictor
from moeoffload.scheduler import group_by_route
from moeoffload.serving import ExpertFlow, Request, SequenceView, Server, serve, summarize
from moeoffload.serving.kv import kv_budget_tokens, kv_bytes_per_token

from . import models as M

FAMILIES = {"mixtral": M.tiny_mixtral, "qwen2_moe": M.tiny_qwen2_moe, "olmoe": M.tiny_olmoe}
LENGTHS, NEW = (5, 9, 3, 12, 7), (4, 2, 5, 3, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_request_gets_the_tokens_generate_gives_it_alone(family):
    model = FAMILIES[family](seed=1)
    model.set_experts_implementation("eager")
    expected = [_alone(model, p, n) for p, n in zip(_prompts(), NEW)]
    requests = [Request(i, p, n) for i, (p, n) in enumerate(zip(_prompts(), NEW))]
    with moeoffload.offload(model, "lru", "50%") as handle:
        # 24 KV tokens: at most two of these requests at once, so admission waits on finishing ones
        run = serve(model, requests, kv_budget=24, max_batch=2, prefill_chunk=4)
        assert handle.stats().misses > 0
    assert [r.tokens for r in run.results] == expected
    assert {len(s.requests) for s in run.steps if s.kind == "decode"} == {1, 2}
    assert any(s.kind == "prefill" and s.tokens == 4 for s in run.steps)
    assert all(s.experts > 0 for s in run.steps)
    summary = summarize(run)
    assert summary.finished == len(requests) and summary.generated_tokens == sum(map(len, expected))


def test_kv_budget_in_bytes_counts_every_layers_keys_and_values():
    config = M.tiny_mixtral().config  # 2 layers, 2 KV heads of 16, fp32
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 2 * 2 * 16 * 2
    assert kv_budget_tokens("8KiB", config) == 8192 // 512
    assert kv_budget_tokens(100, config) == 100 and kv_budget_tokens(None, config) is None


class _FixedRoutes:
    """A stand-in path predictor: route row i for the i-th context, whatever its tokens."""

    def __init__(self, routes):
        self.routes = routes

    def next_routes(self, contexts):
        return self.routes[: len(contexts)]


def test_expertflow_scheduler_groups_requests_by_predicted_route():
    routes = torch.zeros(4, 1, 4, dtype=torch.bool)
    for i, experts in enumerate([(0, 1), (2, 3), (0, 1), (2, 3)]):
        routes[i, 0, list(experts)] = True
    pool = [SequenceView(f"r{i}", 0.0, (1, 2)) for i in range(4)]
    plan = ExpertFlow(_FixedRoutes(routes)).plan(pool, 2)
    assert sorted(map(sorted, plan)) == [["r0", "r2"], ["r1", "r3"]]
    assert [[f"r{i}" for i in b] for b in group_by_route(routes, 2).batches] == plan


def test_expertflow_scheduler_refuses_a_predictor_without_routes():
    with pytest.raises(TypeError, match="next_routes"):
        ExpertFlow(object())


@pytest.fixture(scope="module")
def expertflow_model():
    model = M.tiny_mixtral(seed=1)
    model.set_experts_implementation("eager")
    train = [torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    trace = P.collect_trace(model, train, 4, show_progress=False)
    return model, ExpertFlowPredictor.train(trace, steps=40, show_progress=False)


def test_an_expertflow_policy_is_served_by_expertflow_scheduling_with_exact_tokens(expertflow_model):
    model, predictor = expertflow_model
    prompts = _prompts(seed=3, lengths=(6, 4, 8, 5, 7, 3))
    expected = [_alone(model, p, 3) for p in prompts]
    with moeoffload.offload(model, "expertflow", "50%", predictor=predictor):
        server = Server(model, max_batch=2, prefill_chunk=8)
        assert server.scheduler.name == "expertflow"
        run = server.run([Request(i, p, 3) for i, p in enumerate(prompts)])
    assert run.scheduler == "expertflow" and not run.scheduler_errors
    assert [r.tokens for r in run.results] == expected
    assert max(len(s.requests) for s in run.steps if s.kind == "decode") == 2


def test_first_come_can_be_asked_for_on_an_expertflow_policy(expertflow_model):
    model, predictor = expertflow_model
    with moeoffload.offload(model, "expertflow", "50%", predictor=predictor):
        assert Server(model, scheduler="first-come").scheduler.name == "first-come"
    with moeoffload.offload(model, "lru", "50%"):
        with pytest.raises(ValueError, match="runs no predictor"):
            Server(model, scheduler="expertflow")


def test_transformers_continuous_batching_serves_an_offloaded_model_exactly():
    """What docs/serving.md says of transformers' own loop: it runs the offloaded experts and gives each request
    its own tokens (it lacks a scheduler seam, an injectable clock and per-sequence rows for a path predictor)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = M.tiny_mixtral(seed=1)
    model.set_experts_implementation("eager")
    prompts = _prompts(lengths=(5, 9, 3))
    expected = [_alone(copy.deepcopy(model), p, 4) for p in prompts]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # num_blocks set: on a CPU it would otherwise size its KV cache from the host's memory (minutes)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=32, max_batch_tokens=64, max_requests_per_batch=4,
                                  use_cuda_graph=False, allow_block_sharing=False)
    with moeoffload.offload(model, "lru", "50%"):
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False)
    assert [o.generated_tokens for o in out.values()] == expected


@settings(max_examples=40, deadline=None)
@given(routes=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=9),
       max_batch=st.integers(1, 4))
def test_expertflow_plans_use_every_request_once_in_groups_of_at_most_max_batch(routes, max_batch):
    routes = torch.tensor(routes).view(len(routes), 2, 3)
    pool = [SequenceView(i, 0.0, (1,)) for i in range(len(routes))]
    plan = ExpertFlow(_FixedRoutes(routes)).plan(pool, max_batch)
    assert sorted(i for g in plan for i in g) == list(range(len(routes)))
    assert all(1 <= len(g) <= max_batch for g in plan)
