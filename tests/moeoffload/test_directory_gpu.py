"""fetch="device" on CUDA: the Triton lookup, the fills (queued on the copy engine by the courier, or streamed from
mapped host memory by the SMs), and the grouped kernels give what the resident path gives, run after run."""

import time

import pytest
import torch

import moeoffload
from moeoffload.kernels import hostmap, streamops

from .models import tiny_mixtral

pytestmark = pytest.mark.gpu


def test_device_view_reads_and_writes_host_memory():
    host = torch.randn(1 << 20).to(torch.bfloat16)
    assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * 2, 0)) == 0
    try:
        view = hostmap.device_view(host, torch.device("cuda"))
        assert view.is_cuda and view.dtype == host.dtype and view.shape == host.shape
        assert torch.equal(view.cpu(), host)
        view.mul_(2)  # a kernel's store lands in host memory
        torch.cuda.synchronize()
        assert torch.equal(view.cpu(), host)
    finally:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def test_stream_wait_holds_work_until_another_stream_writes_the_flag():
    """The courier's primitive: work queued after a wait on the flag does not run before the copy stream's write,
    however long the host takes to queue it."""
    device = torch.device("cuda")
    assert streamops.available(device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    x = torch.zeros(1 << 20, device=device)
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()
    done = torch.cuda.Event()
    torch.cuda.synchronize()  # the zeros are written before the other streams look
    with torch.cuda.stream(compute):
        streamops.wait_value(compute, flag, 3)
        x.fill_(1.0)
        done.record(compute)
    streamops.write_value(copy, flag, 2)  # below the wait's value: still held
    time.sleep(0.05)
    # nothing but queries while the stream is held: a kernel's first launch may wait for the whole context
    # (CUDA's lazy loading), which here would wait for the write below
    assert not done.query()
    streamops.write_value(copy, flag, 3)
    deadline = time.monotonic() + 10
    while not done.query():  # poll: a broken write must fail this test, not hang the run
        assert time.monotonic() < deadline, "the compute stream still waits after the flag was written"
        time.sleep(0.001)
    assert x.sum().item() == x.numel()


@pytest.mark.parametrize("mover", ["copy-engine", "sm-loads"])
@pytest.mark.parametrize("budget", ["25%", "50%", "75%"])
def test_cuda_device_fetch_computes_what_the_resident_path_computes(budget, mover):
    """fetch="device" runs the resident path's kernel (the Triton grouped kernel over a tile table built on the
    device) over slots the device filled itself: its logits equal those of every expert resident on the same
    kernels, bit for bit, run after run (a race would move them), and its counts add up."""
    model = tiny_mixtral(seed=5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 96, (b, 9), generator=g).cuda() for b in (1, 4, 16)]

    def logits():
        with torch.no_grad():
            return [model(p).logits.float() for p in prompts]

    with moeoffload.offload(model, "resident", "all", device="cuda", kernels="auto"):
        want = logits()
    with moeoffload.offload(model, "lru", budget, device="cuda", kernels="auto", fetch="device") as h:
        assert h.cache.mover == "copy-engine"  # chosen where stream memory operations work
        h.cache.mover = mover
        runs = [logits() for _ in range(3)]
        s = h.stats()
        assert s.fetch == "device" and s.misses > 0 and s.cache_bytes <= s.budget_bytes
        assert s.h2d_bytes == s.misses * s.expert_bytes and s.h2d_copies == s.misses
    for run in runs:
        for got, ref in zip(run, want):
            assert torch.equal(got, ref), f"fetch='device' ({mover}) at {budget}: logits differ from resident's"


@pytest.mark.parametrize("policy", ["lookahead", "lookahead-next-use"])
@pytest.mark.parametrize("budget", ["25%", "50%", "75%"])
def test_cuda_device_prefetch_changes_what_moves_not_what_is_computed(budget, policy):
    """The lookahead gate through fetch="device": the next layer's guessed experts are copied while this layer
    computes, and a later call may hit a slot whose copy is still in flight (it must wait for it: `owed`). Fed one
    token at a time (decode-sized calls), its logits are the resident path's, bit for bit, run after run, and every
    copy is a miss or a prefetch."""
    model = tiny_mixtral(seed=5, dtype=torch.bfloat16)
    tokens = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(2)).cuda()

    def logits():
        return fed_one_at_a_time(model, tokens)

    with moeoffload.offload(model, "resident", "all", device="cuda", kernels="auto"):
        want = logits()
    with moeoffload.offload(model, policy, budget, device="cuda", kernels="auto", fetch="device") as h:
        assert h.cache.mover == "copy-engine"
        runs = [logits() for _ in range(3)]
        s = h.stats()
        assert s.fetch == "device" and s.prefetches > 0 and s.cache_bytes <= s.budget_bytes
        assert s.h2d_copies == s.misses + s.prefetches and s.h2d_bytes == s.h2d_copies * s.expert_bytes
        assert s.prefetch_hits <= s.prefetches
    for run in runs:
        assert torch.equal(run, want), f"{policy} through fetch='device' at {budget}: logits differ from resident's"


@pytest.mark.parametrize("budget", ["25%", "50%", "75%"])
def test_cuda_next_use_on_the_device_makes_the_host_choices(budget):
    """next-use through fetch="device" on CUDA (the Triton lookup with its score) at batch 16, where a decode step
    uses every expert of every layer: the same misses, evictions and slots as the host path's next-use, fewer misses
    than LRU, and the resident path's logits bit for bit."""
    model = tiny_mixtral(seed=5, dtype=torch.bfloat16, layers=4)
    tokens = torch.randint(2, 96, (16, 8), generator=torch.Generator().manual_seed(3)).cuda()

    def decode():
        return fed_one_at_a_time(model, tokens)

    with moeoffload.offload(model, "resident", "all", device="cuda", kernels="auto"):
        want = decode()
    seen = {}
    for policy, fetch in (("next-use", "host"), ("next-use", "device"), ("lru", "device")):
        with moeoffload.offload(model, policy, budget, device="cuda", kernels="auto", fetch=fetch) as h:
            got = decode()
            s = h.stats()
            seen[policy, fetch] = ((s.hits, s.misses, s.evictions), h.cache.slot_of())
            assert s.fetch == fetch
        assert torch.equal(got, want), f"{policy} through fetch={fetch!r} at {budget}: logits differ from resident's"
    assert seen["next-use", "device"] == seen["next-use", "host"]
    assert seen["next-use", "device"][0][1] <= seen["lru", "device"][0][1]


def fed_one_at_a_time(model, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of `tokens` [batch, length] fed one position at a time with the KV cache: decode-sized calls."""
    out, past = [], None
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            step = model(tokens[:, i : i + 1], past_key_values=past, use_cache=True)
            out.append(step.logits.float())
            past = step.past_key_values
    return torch.cat(out, dim=1)
