"""pytest-benchmark suite for merge_attn_states.

GPU time: each round replays one CUDA graph of many calls over rotated input sets (2x L2 of inputs, at most 16 sets)
and synchronizes, so a round is GPU time for `calls_per_round` calls; extra_info has µs per call, bytes and GB/s.
Eager host cost: each round is a loop of calls on a tiny case with no sync inside (synchronized before, untimed).

    python -m pytest bench --benchmark-enable [--benchmark-json results.json]
    CUPY_OPS_VLLM_ANCHOR=.anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz python -m pytest bench --benchmark-enable

Helpers (inputs, graph capture, providers) come from cupy_ops._bench, which `python -m cupy_ops bench` also uses.
"""

from __future__ import annotations

import os

import pytest
import torch

from cupy_ops import _bench
from cupy_ops._runtime import launcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The anchor's headline shape, a one-token decode step (launch bound), fp32 (widest reads) and fp8 output.
CASES = [
    _bench.MergeCase(4096, 32, 128, torch.bfloat16),
    _bench.MergeCase(1, 32, 128, torch.bfloat16),
    _bench.MergeCase(4096, 32, 128, torch.float32),
    _bench.MergeCase(1024, 128, 128, torch.bfloat16, fp8_output=True),
]
GRAPH_PROVIDERS = ("cupy_ops", "torch", "vllm")
EAGER_PROVIDERS = ("cupy_ops", "cupy_ops_layout_changing", "cupy_ops_dispatcher", "vllm")
ROUNDS = 30
EAGER_CALLS_PER_ROUND = 200
# A round lasts ~2 ms (up to 1024 calls), so graph launch and sync (~10-20 µs of host time) stay ~1%.
ROUND_TARGET_US = 2000.0


@pytest.fixture(scope="module", autouse=True)
def cupy_launch_binding_ready():
    """The first launch imports CuPy's launch binding in the background (launcher.py): let that finish before
    anything is timed, so that no timing shares the CPU with it."""
    fn, args = _bench.merge_eager_calls()["cupy_ops"]
    fn(*args)
    launcher.cupy_binding_ready(timeout=120)


@pytest.fixture(scope="session")
def vllm_ops():
    """vLLM's ops from $CUPY_OPS_VLLM_ANCHOR, or None when it is unset or does not load (why: in skips)."""
    path = os.environ.get("CUPY_OPS_VLLM_ANCHOR")
    ops, error = _bench.try_load_vllm(path)
    return ops, (error if path else "CUPY_OPS_VLLM_ANCHOR is not set")


@pytest.fixture(scope="session")
def l2_bytes():
    return _bench.l2_cache_bytes()


def _provider(name: str, case, vllm, sample_args: tuple):
    """(label, fn(*args)): the torch baseline is labelled torch-eager when torch.compile fails."""
    if name == "torch":
        label, fn, _ = _bench.compile_torch_baseline(_bench.merge_reference_into, sample_args)
        return label, fn
    ops, why = vllm
    if name == "vllm" and ops is None:
        pytest.skip(f"vLLM anchor unavailable: {why}")
    if name == "vllm" and not _bench.vllm_supports_merge(case):
        pytest.skip("vLLM needs the head size to be a whole number of 16-byte packs")
    return name, _bench.merge_providers(case, ops)[name]


@pytest.mark.parametrize("provider", GRAPH_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_merge_gpu_time(benchmark, case, provider, vllm_ops, l2_bytes):
    sets = _bench.make_input_sets(_bench.make_merge_inputs, case, l2_bytes)
    label, fn = _provider(provider, case, vllm_ops, sets[0])
    calls = _bench.calls_per_graph(len(sets), case.bytes_moved, target_us=ROUND_TARGET_US, max_calls=1024)
    graph = _bench.capture_rotated(fn, sets, calls)

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=ROUNDS, warmup_rounds=3)
    benchmark.extra_info.update(provider=label, shape=list(case.shape), dtype=case.dtype_name,
                                bytes_per_call=case.bytes_moved, calls_per_round=calls, input_sets=len(sets))
    if benchmark.stats is not None:  # None under --benchmark-disable
        us = benchmark.stats.stats.median * 1e6 / calls
        benchmark.extra_info.update(us_per_call=us, GBps=case.bytes_moved / (us * 1e3))


@pytest.mark.parametrize("binding", ["ctypes", "cupy"])
@pytest.mark.parametrize("provider", EAGER_PROVIDERS)
def test_merge_eager_host_cost(benchmark, provider, binding, vllm_ops, monkeypatch):
    """Host µs per eager call with our launches through ctypes (before CuPy's binding is ready, or with
    CUPY_OPS_LAUNCH=ctypes) or through CuPy's Cython binding; vLLM's op is timed in both, as the same-moment
    reference."""
    ops, why = vllm_ops
    calls = _bench.merge_eager_calls(ops)
    if provider not in calls:
        pytest.skip(f"vLLM anchor unavailable: {why}")
    cupy_binding = None
    if binding == "cupy":
        cupy_binding = pytest.importorskip("cupy_backends.cuda.api.driver").launchKernel
    launcher.cupy_binding_ready()  # no import in the background during the timing
    monkeypatch.setattr(launcher, "_start_cupy_binding_import", lambda: None)
    monkeypatch.setattr(launcher, "cupy_launch_kernel", cupy_binding)
    fn, args = calls[provider]
    fn(*args)  # compile and load outside the timing
    torch.cuda.synchronize()

    def loop():
        for _ in range(EAGER_CALLS_PER_ROUND):
            fn(*args)

    # The untimed sync before each round empties the launch queue, so host time never waits on the GPU.
    benchmark.pedantic(loop, setup=torch.cuda.synchronize, rounds=ROUNDS, warmup_rounds=2)
    torch.cuda.synchronize()
    benchmark.extra_info.update(provider=provider, shape=[1, 32, 128], dtype="bf16",
                                calls_per_round=EAGER_CALLS_PER_ROUND, launch_binding=binding)
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median * 1e6 / EAGER_CALLS_PER_ROUND
