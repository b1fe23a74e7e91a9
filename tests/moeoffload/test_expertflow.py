"""ExpertFlow: the path predictor learns the routing, the policy stays exact, and the cache corrects itself."""

import pytest
import torch

import moeoffload
from moeoffload import predictors as P
from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule
from moeoffload.predictors.expertflow import ExpertFlowPredictor, PathNetConfig, RoutingPathNet, transitions
from moeoffload.scheduler import compare

from .models import tiny_mixtral, tiny_switch
from .test_cache_properties import filled_store

BUILDS = {"mixtral": tiny_mixtral, "switch": tiny_switch}


def _prompts(n, seed, batch=4, length=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 96, (batch, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def one_thread():
    """Small nets train far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BUILDS))
def trained(request, one_thread):
    model = BUILDS[request.param](seed=1)
    trace = P.collect_trace(model, _prompts(6, seed=0), 4, show_progress=False)
    train, held = trace.split(0.3)
    predictor = ExpertFlowPredictor.train(train, steps=150, show_progress=False)
    return request.param, model, train, held, predictor


def test_trained_path_net_is_for_inference_only(trained):
    """No gradient or optimizer state outlives training: what the device holds for the predictor is its weights."""
    net = trained[-1].net
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_path_predictor_beats_random_on_held_out_routing(trained):
    name, _, _, held, predictor = trained
    ours = P.summary(P.evaluate(predictor, held))
    chance = P.summary(P.evaluate(P.RandomPredictor(held.num_experts, held.top_k, seed=0), held))
    assert ours["hit_rate"] > chance["hit_rate"] + 0.1, (name, ours, chance)
    assert ours["exact"] > chance["exact"], (name, ours, chance)


def test_expertflow_policy_keeps_greedy_tokens_and_corrects_on_disagreement(trained):
    name, model, _, _, predictor = trained
    ids = _prompts(1, seed=7, batch=2, length=9)[0]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    for budget in ["25%", "50%"]:
        with moeoffload.offload(model, "expertflow", budget, device="cpu", predictor=predictor) as h:
            assert type(h.runahead).__name__ == "ExpertFlowRunAhead"
            with torch.no_grad():
                tokens = model.generate(ids, **kwargs)
            s, c = h.stats(), h.runahead.correction
        assert torch.equal(tokens, reference), (name, budget)
        assert s.cache_bytes <= s.budget_bytes and s.prefetches > 0
        assert c.layer_calls > 0 and 0 < c.corrections <= c.layer_calls  # a learned guess is sometimes wrong
        assert c.precision > 0 and c.recall > 0


def test_correction_demotes_wrong_prefetches_and_repredicts_from_the_real_route():
    """A predictor that always guesses the experts the router never picks: every checked call is corrected,
    the wrong prefetches are demoted, and the output is still the unoffloaded model's."""
    model = tiny_mixtral(seed=2)
    ids = _prompts(1, seed=3, batch=1, length=5)[0]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    net = RoutingPathNet(PathNetConfig(96, 2, 8, 2, d_model=16, heads=2, depth=1, window=16))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias.view(2, 8)[:, 6:] = 10.0  # experts 6 and 7 at both layers, for every token
    flat = torch.full((8, 8), 1.0 / 8).log()
    wrong = ExpertFlowPredictor(net, {1: flat}, {"layer_stack": [0, 0]})
    with moeoffload.offload(model, "expertflow", "50%", device="cpu", predictor=wrong) as h:
        with torch.no_grad():
            tokens = model.generate(ids, **kwargs)
        c = h.runahead.correction
    assert torch.equal(tokens, reference)
    assert c.true_positive < c.predicted  # the router did not pick 6 and 7 everywhere
    assert c.corrections >= c.layer_calls // 2 and c.demoted > 0 and c.corrected_tokens > 0


def test_correct_uses_the_transition_from_the_routed_expert():
    net = RoutingPathNet(PathNetConfig(10, 2, 4, 1, d_model=8, heads=2, depth=1, window=8))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    trans = torch.full((4, 4), 1e-6)
    trans[2, 3] = 1.0  # after expert 2 comes expert 3
    predictor = ExpertFlowPredictor(net, {1: (trans / trans.sum(1, keepdim=True)).log()}, {"layer_stack": [0, 0]})
    predictor.predict(P.StackInputs(0, [0, 1], torch.tensor([[1, 2, 3]]), True))
    routed = torch.tensor([[2], [2], [0]])
    fixed = predictor.correct(0, 1, routed, torch.tensor([True, False, True]))
    assert fixed[0, 0] == 3  # corrected from its real route
    assert fixed[2, 0] != 3  # a real route that says nothing about expert 3
    assert predictor.correct(0, 0, routed, torch.ones(3, dtype=torch.bool)) is None  # no layer before layer 0


def test_cache_evicts_demoted_experts_first():
    cache = ExpertCache(filled_store(1, 4), 3, "cpu", make_rule("lru"))
    cache.prefetch([(0, 0), (0, 1), (0, 2)])
    assert cache.demote([(0, 2), (0, 3)]) == 1  # (0, 3) is not resident
    cache.acquire([(0, 3)])  # LRU alone would evict (0, 0)
    assert cache.resident() == {(0, 0), (0, 1), (0, 3)}
    cache.release([(0, 3)])
    cache.demote([(0, 1)])
    cache.acquire([(0, 1)])  # used after all: no longer demoted
    cache.release([(0, 1)])
    cache.acquire([(0, 2)])
    assert (0, 1) in cache.resident() and (0, 0) not in cache.resident()


def test_save_load_round_trip_and_bad_file(trained, tmp_path):
    _, _, _, held, predictor = trained
    predictor.save(tmp_path / "ef.pt")
    again = ExpertFlowPredictor.load(tmp_path / "ef.pt")
    chunk = held.chunks[0]
    layers = sorted(chunk["layers"])
    inputs = P.StackInputs(chunk["stack"], layers, chunk["tokens"], True)
    assert torch.equal(predictor.predict(inputs).top_k_ids, again.predict(inputs).top_k_ids)
    torch.save({"kind": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an ExpertFlow predictor"):
        ExpertFlowPredictor.load(tmp_path / "x.pt")


def test_decode_step_sees_its_context_like_the_whole_sequence(trained):
    """Causal attention: predicting a sequence token by token (decode) equals predicting it at once."""
    _, _, train, _, predictor = trained
    chunk = train.chunks[0]
    s, layers, tokens = chunk["stack"], sorted(chunk["layers"]), chunk["tokens"][:2, :6]
    whole = predictor.predict(P.StackInputs(s, layers, tokens, True)).top_k_ids.view(len(layers), 2, 6, -1)
    first = predictor.predict(P.StackInputs(s, layers, tokens[:, :5], True)).top_k_ids
    step = predictor.predict(P.StackInputs(s, layers, tokens[:, 5:], False)).top_k_ids
    assert torch.equal(first.view(len(layers), 2, 5, -1), whole[:, :, :5])
    assert torch.equal(step.view(len(layers), 2, 1, -1), whole[:, :, 5:])


def test_predicted_routes_feed_the_scheduler(trained):
    _, _, train, _, predictor = trained
    pool = torch.cat([c["tokens"] for c in train.chunks if c["stack"] == 0])
    routes = predictor.routes(pool)
    assert routes.shape == (pool.shape[0], train.num_layers, train.num_experts) and routes.dtype == torch.bool
    gain = compare(routes, batch_size=2)
    assert gain.scheduled <= gain.first_come


def test_transitions_are_normalised_log_probabilities(trained):
    _, _, train, _, _ = trained
    for t in transitions(train).values():
        assert t.shape == (train.num_experts, train.num_experts)
        assert torch.allclose(t.exp().sum(1), torch.ones(train.num_experts))
