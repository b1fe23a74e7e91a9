"""fetch="device" on CUDA: the Triton lookup, the fills streamed from mapped host memory, and the grouped kernels
give what the host path gives (the same grouped kernels, copies by the copy engine), run after run."""

import pytest
import torch

import moeoffload
from moeoffload.kernels import hostmap

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


@pytest.mark.parametrize("budget", ["25%", "50%", "75%"])
def test_cuda_device_fetch_matches_host_fetch(budget):
    model = tiny_mixtral(seed=5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 96, (b, 9), generator=g).cuda() for b in (1, 4, 16)]

    def run():
        with torch.no_grad():
            return [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=10, do_sample=False)
                    for p in prompts]

    results = {}
    for fetch in ("host", "device"):
        with moeoffload.offload(model, "lru", budget, device="cuda", kernels="auto", fetch=fetch) as h:
            runs = [run() for _ in range(3)]
            s = h.stats()
            results[fetch] = (runs, (s.hits, s.misses, s.evictions, s.h2d_bytes), h.cache.slot_of())
            assert s.misses > 0 and s.cache_bytes <= s.budget_bytes
    host_runs, host_counts, host_slots = results["host"]
    dev_runs, dev_counts, dev_slots = results["device"]
    for got_run in dev_runs:
        for got, want in zip(got_run, host_runs[0]):
            assert torch.equal(got, want), f"fetch='device' at {budget} differs from fetch='host'"
    assert dev_counts == host_counts and dev_slots == host_slots
