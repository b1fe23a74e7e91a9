"""The predictor framework: traces record the router's choices and round-trip through files; every exact
predictive policy keeps the unoffloaded model's greedy tokens; a broken predictor falls back with a warning."""

import warnings

import pytest
import torch

import moeoffload
from moeoffload import predictors as P
from moeoffload.policies import PREDICTIVE

from .models import tiny_mixtral, tiny_switch

BUILDS = {"mixtral": tiny_mixtral, "switch": tiny_switch}


def _prompts(n, seed, batch=3, length=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 96, (batch, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=list(BUILDS))
def prepared(request):
    model = BUILDS[request.param](seed=3)
    trace = P.collect_trace(model, _prompts(4, seed=11), 5, show_progress=False)
    train, held = trace.split(0.25)
    sida = P.SidaPredictor.create(model, train, dim=32).train(train, epochs=8, show_progress=False)
    return request.param, model, trace, train, held, sida


def test_trace_records_every_layer_and_round_trips(prepared, tmp_path):
    name, model, trace, *_ = prepared
    n_layers = len(moeoffload.offload.__globals__["hooks"].discover(model).layers)
    assert trace.num_layers == n_layers and trace.chunks
    for chunk in trace.chunks:
        layers = [i for i, s in enumerate(trace.info["layer_stack"]) if s == chunk["stack"]]
        assert sorted(chunk["layers"]) == layers
        for rec in chunk["layers"].values():
            assert rec["ids"].shape[0] == chunk["tokens"].numel() == rec["logits"].shape[0]
            # the recorded ids are the router's top-k of the recorded logits (Switch: unless capacity-dropped)
            routed = rec["ids"][:, 0] < trace.num_experts
            assert torch.equal(rec["logits"].float().argmax(-1)[routed], rec["ids"][routed, 0])
    trace.save(tmp_path / "t.pt")
    again = P.RoutingTrace.load(tmp_path / "t.pt")
    assert again.info == trace.info and len(again.chunks) == len(trace.chunks)
    assert torch.equal(again.chunks[0]["tokens"], trace.chunks[0]["tokens"])


def test_trace_load_rejects_other_files(tmp_path):
    torch.save({"kind": "something"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a moeoffload routing trace"):
        P.RoutingTrace.load(tmp_path / "x.pt")


def test_evaluate_scores_oracle_like_predictions_perfectly(prepared):
    _, _, trace, *_ = prepared

    class Replay:
        name = "replay"

        def reset(self):
            pass

        def predict(self, inputs):
            chunk = next(c for c in trace.chunks if c["tokens"] is inputs.input_ids)
            ids = torch.stack([chunk["layers"][i]["ids"] for i in inputs.layers])
            return P.Prediction(list(inputs.layers), ids)

    scores = P.evaluate(Replay(), trace)
    for m in scores.values():
        if m["tokens"]:
            assert m["recall"] == 1.0 and m["precision"] == 1.0


def test_every_exact_predictive_policy_keeps_greedy_tokens(prepared):
    name, model, trace, train, held, sida = prepared
    ids = _prompts(1, seed=99, batch=2, length=8)[0]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    freq = P.FrequencyPrior.fit(train)

    def run():
        with torch.no_grad():
            model.generate(ids.to(model.device), **kwargs)

    calls = P.prepare("oracle", model, run=run, budget="50%", device="cpu")
    expertflow = P.ExpertFlowPredictor.train(train, steps=10, show_progress=False)
    given = {"sida": sida, "frequency": freq, "oracle": calls, "belady": calls, "oracle-belady": calls,
             "expertflow": expertflow}
    hit_rates = {}
    for policy in [p for p in PREDICTIVE if p.exact and p.name in given]:
        for budget in ["25%", "50%"]:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no fallback may hide a broken predictor
                with moeoffload.offload(model, policy.name, budget, device="cpu", predictor=given[policy.name]) as h:
                    with torch.no_grad():
                        tokens = model.generate(ids, **kwargs)
                    s = h.stats()
            assert torch.equal(tokens, reference), (name, policy.name, budget)
            assert s.cache_bytes <= s.budget_bytes
            hit_rates[policy.name, budget] = s.hit_rate
    with moeoffload.offload(model, "lru", "50%", device="cpu") as h:
        with torch.no_grad():
            model.generate(ids, **kwargs)
        lru = h.stats().hit_rate
    assert hit_rates["belady", "50%"] >= lru  # the bound on demand caching, on the recorded inputs


def test_predictive_policies_declare_what_they_need():
    needs = {p.name: P.needs(p) for p in PREDICTIVE}
    assert needs["sida"] == needs["frequency"] == "training-trace"
    assert needs["oracle"] == needs["belady"] == "exact-trace"
    assert P.needs("lru") is None
    model = tiny_mixtral(seed=0)
    with pytest.raises(moeoffload.MoeOffloadError, match="needs a trained predictor"):
        moeoffload.offload(model, "sida", "50%", device="cpu")
    with pytest.raises(moeoffload.MoeOffloadError, match="needs a CallTrace"):
        moeoffload.offload(model, "oracle", "50%", device="cpu", predictor=P.FrequencyPrior(torch.ones(2, 8), 2))
    assert getattr(model, "_moeoffload", None) is None  # refused before any weight moved


class _Broken:
    name = "broken"

    def __init__(self, mode, layers):
        self.mode, self.layers = mode, layers

    def reset(self):
        pass

    def predict(self, inputs):
        if self.mode == "raises":
            raise RuntimeError("predictor crashed")
        n = inputs.input_ids.numel()
        ids = torch.full((len(inputs.layers), n, 2), 10_000)
        return P.Prediction(list(inputs.layers), ids, torch.full(ids.shape, 0.5))


@pytest.mark.parametrize("policy", ["sida", "sida-data-aware"])
@pytest.mark.parametrize("mode", ["raises", "out-of-range"])
def test_broken_predictor_falls_back_with_a_warning_and_never_routes_out_of_range(policy, mode):
    model = tiny_mixtral(seed=4)
    ids = _prompts(1, seed=5, batch=2, length=6)[0]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    with moeoffload.offload(model, policy, "50%", device="cpu", predictor=_Broken(mode, 2)):
        with pytest.warns(RuntimeWarning, match="failed"):
            with torch.no_grad():
                tokens = model.generate(ids, **kwargs)
    assert torch.equal(tokens, reference)  # out-of-range ids never became routing: the router decided


def test_device_bytes_counts_a_predictors_own_storages_once_and_not_the_models():
    """What a suite charges a predictor for: its networks and tables on the device, each storage once, less the
    tensors it shares with the model (SiDA reads the model's embeddings)."""
    from moeoffload.predictors.base import device_bytes

    model = torch.nn.Embedding(100, 8)
    embedding = model.weight  # the model's: 3200 bytes, excluded
    net = torch.nn.Linear(8, 4)  # 32 + 4 floats = 144 bytes

    class Holder:
        def __init__(self):
            self.embedding, self.nets, self.table = embedding, {0: net}, [torch.ones(10), net.weight]

    cpu = torch.device("cpu")
    got = device_bytes(Holder(), cpu, shared_with=model)
    assert got == (32 + 4 + 10) * 4
    assert device_bytes(Holder(), torch.device("meta")) == 0  # nothing of it lives there


def test_device_bytes_counts_gradients_left_on_a_network():
    """A trained network that kept its gradients holds them on the device as well: on the H100, ExpertFlow's
    path net kept its 37 MiB embedding gradient, uncounted, and Qwen1.5's expertflow cases failed their GPU
    memory check by 30 MiB."""
    from moeoffload.predictors.base import device_bytes

    net = torch.nn.Linear(8, 4)
    net(torch.ones(2, 8)).sum().backward()
    assert device_bytes(net, torch.device("cpu")) == 2 * (32 + 4) * 4


def test_runahead_footprint_is_zero_on_a_cpu_and_the_run_stays_exact(prepared):
    """The footprint probe is a GPU measurement (the side stream's peak); on a CPU it is 0, and the probe's
    prediction (state reset afterwards) does not change what the model then generates."""
    name, model, trace, train, held, sida = prepared
    ids = _prompts(1, seed=5, batch=2, length=8)[0]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    with moeoffload.offload(model, "sida", "50%", device="cpu", predictor=sida) as h:
        assert h.runahead.footprint(ids) == 0
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kwargs), reference), name
        assert h.stats().predictor_bytes == 0  # nothing of it on a CUDA device


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_stack_call_continues_a_sequence_whichever_name_its_cache_comes_under(name):
    """transformers renamed the forward's `past_key_values` to `cache`; a run-ahead predictor must still see a
    decode step as the continuation of its sequence (ExpertFlow keeps the context of those)."""
    from transformers import DynamicCache

    from moeoffload.predictors.base import stack_call

    ids = torch.tensor([[5]])
    cache = DynamicCache(ddp_cache_data=[(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))])
    assert stack_call((), {"input_ids": ids, name: cache}) == (ids, False)
    assert stack_call((), {"input_ids": ids, name: DynamicCache()})[1] is True
