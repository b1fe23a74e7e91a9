"""Kernels against a float64 reference on fresh random inputs, outputs poisoned with NaN before each run.

CPU: the torch fallback at small shapes, and the Triton kernels themselves through Triton's interpreter
(a subprocess with TRITON_INTERPRET=1; float32/float16, as the interpreter has no bfloat16). GPU: Triton at real
shapes up to Mixtral's 4096/14336, and the layer's grouped path against eager greedy tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moeoffload import kernels
from moeoffload.kernels.streamops import as_int32
from moeoffload.layout import ExpertLayout

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def reference(kind, hidden, top_k_index, top_k_weights, experts):
    """float64: out[t] = sum_k w[t,k] * FFN_e(x[t]) over valid ids; experts: e -> (w1, w2)."""
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    x = hidden.double()
    for e, (w1, w2) in experts.items():
        mask = top_k_index == e  # [T, k]
        if not mask.any():
            continue
        tok, pos = torch.nonzero(mask, as_tuple=True)
        h = x[tok] @ w1.double().T
        if kind == "gated-silu":
            inter = w2.shape[1]
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        else:
            h = torch.relu(h)
        y = (h @ w2.double().T) * top_k_weights[tok, pos, None].double()
        out.index_add_(0, tok, y)
    return out


def run_case(kind, tokens, hidden_size, inter, n_experts, top_k, dtype, device, backend, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows1 = 2 * inter if kind == "gated-silu" else inter
    layout = ExpertLayout(("w1", "w2"), ((rows1, hidden_size), (hidden_size, inter)), dtype)
    n_slots = n_experts + 1
    pool = (torch.randn(n_slots, layout.numel, generator=g) / hidden_size**0.5).to(dtype).to(device)
    slot_of = torch.randperm(n_slots, generator=g)[:n_experts].tolist()  # experts sit in scattered slots
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype).to(device)
    top_k_index = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    if tokens > 1:
        top_k_index[0, -1] = n_experts  # a pair routed to no expert (Switch's capacity drop)
    if tokens > 2:
        top_k_index[-1, 0] = -1  # and an id below the range, which counts as no expert too
    top_k_weights = torch.rand(tokens, top_k, generator=g).to(dtype).to(device)

    order, counts = kernels.sort_by_expert(top_k_index, n_experts)
    n_valid = sum(counts)
    x = kernels.permute(hidden, order[:n_valid] % tokens, backend=backend)
    assert torch.equal(x, hidden[(order[:n_valid] % tokens)])
    y = torch.full_like(x, float("nan"))
    groups, start = [], 0
    for e, c in enumerate(counts):
        groups.append((start, start + c, slot_of[e]))
        start += c
    spec = kernels.FFNSpec.from_layout(kind, layout)
    kernels.grouped_ffn(spec, x, pool, groups, y, backend=backend)
    assert not torch.isnan(y).any(), "a row of the grouped FFN was not written"
    out = kernels.unpermute(y, kernels.inverse_order(order, n_valid), top_k_weights, dtype, backend=backend)
    assert not torch.isnan(out).any()
    experts = {e: tuple(layout.views(pool[slot_of[e]]).values()) for e in range(n_experts)}
    ref = reference(kind, hidden, top_k_index, top_k_weights, experts)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], f"{kind} T={tokens} H={hidden_size} I={inter} {dtype}: rel err {err:.2e}"

    # the resident path's route, decided on the device: same groups, rows past the valid ones never read
    slot_of_id = kernels.slot_lookup(torch.tensor(slot_of, device=device), n_slots)
    slot_ends = torch.arange(1, n_slots + 1, dtype=torch.int32, device=device)
    order, inverse, offs = kernels.route_on_device(top_k_index, slot_of_id, slot_ends, backend=backend)
    per_slot = [0] * n_slots
    for e, c in enumerate(counts):
        per_slot[slot_of[e]] = c
    assert offs.tolist() == torch.tensor(per_slot).cumsum(0).tolist()
    x = kernels.permute(hidden, order, backend=backend, divisor=top_k)
    y = kernels.grouped_ffn_by_offsets(spec, x, pool, offs)
    y[n_valid:] = float("nan")  # what torch's grouped GEMM leaves there: undefined
    out = kernels.unpermute(y, inverse, top_k_weights, dtype, backend=backend, token_major=True, limit=offs[-1:])
    assert not torch.isnan(out).any()
    err_device = ((out.double() - ref).norm() / ref.norm()).item()
    assert err_device < TOLERANCE[dtype], f"device route: rel err {err_device:.2e}"

    # fetch="device"'s tiles: the same route, and the FFN over the routed slots only (a tile table built on the device)
    tile_m = kernels.tile_rows(tokens)
    order_t, inverse_t, offs_t, tiles = kernels.route_tiles_on_device(top_k_index, slot_of_id, slot_ends, tile_m,
                                                                      backend=backend)
    assert order_t.tolist() == order.tolist() and inverse_t.tolist() == inverse.tolist()
    assert offs_t.tolist() == offs.tolist()
    y = torch.full_like(x, float("nan"))
    kernels.grouped_ffn_by_tiles(spec, x, pool, tiles, tokens, backend=backend, out=y)
    assert not torch.isnan(y[:n_valid]).any(), "a routed row of the tiled FFN was not written"
    out = kernels.unpermute(y, inverse, top_k_weights, dtype, backend=backend, token_major=True, limit=offs[-1:])
    err_tiles = ((out.double() - ref).norm() / ref.norm()).item()
    assert err_tiles < TOLERANCE[dtype], f"device tiles: rel err {err_tiles:.2e}"
    return err


CPU_SHAPES = [(1, 32, 48, 4, 2), (5, 32, 48, 4, 2), (37, 64, 96, 8, 2), (16, 48, 80, 8, 1)]


@pytest.mark.parametrize("kind", kernels.FFN_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_torch_fallback_matches_float64(kind, dtype, shape):
    for seed in range(2):
        run_case(kind, *shape, dtype, "cpu", "torch", seed)


def check_route(pairs: int, top_k: int, n_experts: int, n_slots: int, device: str, backend: str, seed: int) -> None:
    """`route_on_device` (one Triton launch at decode sizes) against its torch form and the definition: a stable
    sort of the pairs by slot, ids outside 0..E-1 last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n_experts + 2, (pairs // top_k, top_k), generator=g)
    slot_of = torch.randperm(n_slots, generator=g)[:n_experts]
    slot_of_id = kernels.slot_lookup(slot_of.to(device), n_slots)
    slot_ends = torch.arange(1, n_slots + 1, dtype=torch.int32, device=device)
    order, inverse, offs = kernels.route_on_device(ids.to(device), slot_of_id, slot_ends, backend=backend)
    slot = [int(slot_of[i]) if 0 <= i < n_experts else n_slots for i in ids.reshape(-1).tolist()]
    want = sorted(range(len(slot)), key=lambda p: (slot[p], p))
    assert order.tolist() == want
    assert [want.index(p) for p in range(len(slot))] == inverse.tolist()
    assert offs.tolist() == [sum(s <= i for s in slot) for i in range(n_slots)]
    for tile_m in (1, 2, 16):  # the tile table: a run of tile_m rows of one slot per tile, empty tiles elsewhere
        *route, tiles = kernels.route_tiles_on_device(ids.to(device), slot_of_id, slot_ends, tile_m, backend=backend)
        assert [t.tolist() for t in route] == [order.tolist(), inverse.tolist(), offs.tolist()]
        ordered = sorted(slot)
        want_tiles = [[], [], []]
        for row, s in enumerate(ordered):
            starts = s < n_slots and (row - ordered.index(s)) % tile_m == 0
            end = len(ordered) - ordered[::-1].index(s)
            for column, value in enumerate((row, end if starts else row, s if starts else 0)):
                want_tiles[column].append(value)
        assert tiles.tolist() == want_tiles, f"tile_m={tile_m}"
        # split by landing: tiles of slots whose copy has landed (landing <= flag, int32 wrap), then the others
        flag_value = (1 << 31) - 3  # near the wrap: sequence numbers past it are negative as int32
        landing_seq = [flag_value + int(d) for d in torch.randint(-3, 4, (n_slots,), generator=g)]
        landing = torch.tensor([as_int32(v) for v in landing_seq], dtype=torch.int32, device=device)
        flag = torch.tensor([flag_value], dtype=torch.int32, device=device)
        *route, split = kernels.route_tiles_on_device(ids.to(device), slot_of_id, slot_ends, tile_m,
                                                      backend=backend, landing=landing, flag=flag)
        assert [t.tolist() for t in route] == [order.tolist(), inverse.tolist(), offs.tolist()]
        for half, part in enumerate((split[:3], split[3:])):
            want_part = [list(column) for column in want_tiles]
            for i, (row, end, s) in enumerate(zip(*want_tiles)):
                landed = landing_seq[s] <= flag_value
                if end > row and landed != (half == 0):
                    want_part[1][i], want_part[2][i] = row, 0
            assert part.tolist() == want_part, f"tile_m={tile_m}, {'later' if half else 'now'}"


@pytest.mark.parametrize("shape", [(1, 1, 4, 5), (16, 2, 8, 9), (64, 8, 64, 200), (130, 2, 8, 9)])
def test_device_route_matches_its_definition(shape):
    check_route(*shape, "cpu", "torch", seed=shape[0])


def interpreter_checks() -> None:
    """Run by the subprocess below, with TRITON_INTERPRET=1."""
    for i, shape in enumerate([(1, 1, 4, 5), (16, 2, 8, 9), (64, 8, 64, 200), (128, 4, 16, 17), (130, 2, 8, 9)]):
        check_route(*shape, "cpu", "triton", seed=i)
    for kind in kernels.FFN_KINDS:
        for dtype in (torch.float32, torch.float16):
            for i, shape in enumerate([(1, 32, 48, 4, 2), (9, 32, 40, 4, 2), (21, 16, 24, 3, 1)]):
                run_case(kind, *shape, dtype, "cpu", "triton", seed=100 + i)
    print("interpreter ok")


@pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed (pip install triton): the "
                    "Triton kernels cannot be run through its CPU interpreter")
def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import tests.moeoffload.test_kernels as t; t.interpreter_checks()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_layer_grouped_path_matches_loop_on_cpu():
    """The layer's grouped path (plain torch) agrees with the exact loop, whatever waves the budget forces."""
    import moeoffload

    from .models import tiny_mixtral

    model = tiny_mixtral(seed=3, dtype=torch.float32)
    ids = torch.randint(2, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    for budget in ("25%", "all"):
        with moeoffload.offload(model, "lru", budget, device="cpu", kernels="reference") as h:
            if getattr(h.hook, "ffn_kind", None) != "gated-silu":
                pytest.skip("the Mixtral hook does not declare its expert form (ffn_kind) yet")
            assert h.plan.kernels == "reference"
            with torch.no_grad():
                got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["resident", "lru"])
def test_resident_path_routes_on_the_device_and_matches_the_loop(policy):
    """Once every expert of a layer is resident for good (a budget that holds the model), the grouped modes route
    on the device (no host sync); the output still agrees with the exact loop and every request counts as a hit."""
    import moeoffload

    from .models import tiny_mixtral

    model = tiny_mixtral(seed=3, dtype=torch.float32)
    ids = torch.randint(2, 96, (4, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    with moeoffload.offload(model, policy, "all", device="cpu", kernels="reference") as h:
        h.cache.preload(h.store.keys())
        with torch.no_grad():
            got = model(ids).logits
        cache = h.cache
        assert sorted(cache._tables) == list(range(len(h.layers)))  # every layer took the resident path
        hits = cache.stats.hits
        assert cache.stats.misses == 0 and hits > 0
        stats = h.stats()
        # exact against resident on the same plan (tests/moeoffload/test_plan.py); against the loop within rounding
        assert (stats.kernels, stats.exact) == ("reference", True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with moeoffload.offload(model, policy, "all", device="cpu") as h:  # the exact loop counts the same requests
        h.cache.preload(h.store.keys())
        with torch.no_grad():
            model(ids)
        assert h.cache.stats.hits == hits
        assert (h.stats().kernels, h.stats().exact) == ("exact", True)
    with moeoffload.offload(model, "lru", "25%", device="cpu", kernels="reference") as h:
        with torch.no_grad():
            model(ids)
        assert h.cache.resident_table(0, h.store.num_experts) is None  # it could evict: the host must route


def test_a_call_larger_than_the_device_routing_takes_the_host_path_with_the_same_bits():
    """A call with more (token, expert) pairs than the routing's one launch takes (a prefill) routes on the host;
    its rows are computed by the same kernel, so its logits are those of the same tokens routed on the device."""
    import moeoffload
    from moeoffload.kernels.routing import FUSED_ROUTE_MAX_PAIRS

    from .models import tiny_mixtral

    model = tiny_mixtral(seed=3, dtype=torch.float32)
    tokens = FUSED_ROUTE_MAX_PAIRS // 2 + 1  # top-2: just past the limit
    ids = torch.randint(2, 96, (1, tokens), generator=torch.Generator().manual_seed(4))
    with moeoffload.offload(model, "resident", "all", device="cpu", kernels="reference"):
        with torch.no_grad():
            long = model(ids).logits
            short = model(ids[:, :8]).logits  # the device path
    torch.testing.assert_close(long[:, :8], short, rtol=1e-4, atol=1e-4)  # causal: the first 8 positions agree


# -- GPU ------------------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 4096, 14336, 8, 2), (16, 4096, 14336, 8, 2), (256, 4096, 14336, 8, 2), (4096, 4096, 14336, 8, 2),
              (7, 768, 3072, 8, 1), (300, 1024, 2816, 16, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "T{}-H{}-I{}-E{}-k{}".format(*s))
def test_triton_matches_float64_on_gpu(shape):
    run_case("gated-silu", *shape, torch.bfloat16, "cuda", "triton", seed=shape[0])
    if shape[1] <= 1024:
        run_case("dense-relu", *shape, torch.bfloat16, "cuda", "triton", seed=shape[0] + 1)


@pytest.mark.gpu
def test_device_route_matches_its_definition_on_gpu():
    """The routing kernel on CUDA (its tile table, split by landed copies too) against the definition."""
    for i, shape in enumerate([(1, 1, 4, 5), (16, 2, 8, 9), (64, 8, 64, 200), (128, 4, 16, 17), (130, 2, 8, 9)]):
        check_route(*shape, "cuda", "triton", seed=i)


@pytest.mark.gpu
def test_kernel_path_gives_eager_greedy_tokens_on_gpu():
    import moeoffload

    from .models import tiny_mixtral

    model = tiny_mixtral(seed=11, dtype=torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (b, 11), generator=g).cuda() for b in (1, 4, 16)]

    def run():
        with torch.no_grad():
            return [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=12, do_sample=False)
                    for p in prompts], model(prompts[-1]).logits.float()

    want, want_logits = run()
    model.cpu()
    for budget in ("25%", "all"):
        with moeoffload.offload(model, "lru", budget, device="cuda", kernels="triton") as h:
            assert h.plan.kernels == "triton"
            got, logits = run()
        # Not bit-exact against eager (another summation order): a near-tie may flip a greedy token, as it did on an
        # H100 80GB HBM3. Most tokens must still agree; bit identity holds against resident on the same kernels.
        same = sum(int((a == b).sum()) for a, b in zip(got, want)) / sum(b.numel() for b in want)
        assert same >= 0.9, f"only {same:.0%} of greedy tokens agree with eager on the Triton path at budget {budget}"
        err = ((logits - want_logits).norm() / want_logits.norm()).item()
        assert err < 2e-2, f"logits rel err {err:.2e}"
