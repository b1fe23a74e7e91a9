"""SiDA-MoE's hash network: learns the routing of a tiny model better than chance, saves and loads, and its
data-aware mode is declared approximate (its predictions replace the router)."""

import torch

import moeoffload
from moeoffload import predictors as P
from moeoffload.predictors.sida import sparsemax, truncated_kd_loss

from .models import tiny_switch


def test_sparsemax_is_a_sparse_distribution():
    p = sparsemax(torch.tensor([[3.0, 1.0, 0.2, -2.0]]))
    assert torch.allclose(p.sum(-1), torch.ones(1)) and (p == 0).any() and (p >= 0).all()


def test_truncated_kd_ignores_the_teacher_tail():
    teacher = torch.tensor([[5.0, 4.0, -1.0, -9.0]])
    a = truncated_kd_loss(torch.tensor([[5.0, 4.0, 0.0, 0.0]]), teacher, truncate=2)
    b = truncated_kd_loss(torch.tensor([[5.0, 4.0, 0.0, 0.0]]), teacher + torch.tensor([[0, 0, 3.0, 5.0]]), 2)
    assert torch.allclose(a, b)  # only the top-T logits of the teacher matter


def test_sida_beats_random_saves_loads_and_data_aware_is_approximate(tmp_path):
    model = tiny_switch(seed=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 96, (4, 12), generator=g) for _ in range(4)]
    trace = P.collect_trace(model, prompts, 4, show_progress=False)
    train, held = trace.split(0.2)
    losses = []
    sida = P.SidaPredictor.create(model, train, dim=32).train(train, epochs=8, show_progress=False, log=losses)
    assert losses[-1] < losses[0]
    # inference only from here: no gradient outlives training to be held on the device uncounted
    assert all(p.grad is None and not p.requires_grad for net in sida.nets.values() for p in net.parameters())
    ours = P.summary(P.evaluate(sida, held))
    chance = P.summary(P.evaluate(P.RandomPredictor(trace.num_experts, trace.top_k), held))
    assert ours["hit_rate"] > chance["hit_rate"]

    sida.save(tmp_path / "sida.pt")
    again = P.SidaPredictor.load(tmp_path / "sida.pt", model)
    inputs = P.StackInputs(0, sida.layers_of(0), held.chunks[0]["tokens"], True)
    assert torch.equal(sida.predict(inputs).top_k_ids, again.predict(inputs).top_k_ids)

    policy = moeoffload.get_policy("sida-data-aware")
    assert not policy.exact and policy.replace_router
    assert moeoffload.get_policy("sida").exact
    ids = prompts[0][:2]
    with moeoffload.offload(model, policy, "50%", device="cpu", predictor=again) as h:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert h.stats().exact is False


def test_sida_networks_start_from_their_seed_whatever_ran_before():
    """A suite's SiDA figures must not depend on which cases ran first (they once did: the networks were drawn from
    the global random state), and creating them must leave that state alone."""
    model = tiny_switch(seed=2)
    trace = P.collect_trace(model, [torch.randint(2, 96, (2, 8), generator=torch.Generator().manual_seed(3))], 2,
                            show_progress=False)

    def weights(predictor):
        return [p.detach().clone() for net in predictor.nets.values() for p in net.parameters()]

    torch.manual_seed(123)
    first = weights(P.SidaPredictor.create(model, trace, dim=16))
    torch.rand(7)  # something else draws in between
    state = torch.get_rng_state()
    second = weights(P.SidaPredictor.create(model, trace, dim=16))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = weights(P.SidaPredictor.create(model, trace, dim=16, seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
