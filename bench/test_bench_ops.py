"""pytest-benchmark suite of every op with a benchmark suite (cupy_ops/_bench/<op>.py), quick cases.

GPU time: each round replays one CUDA graph of many calls over rotated input sets (2x L2 of inputs, at most 16 sets)
and synchronizes, so a round is GPU time for `calls_per_round` calls; extra_info has µs per call, bytes and GB/s.
Eager host cost: each round is a loop of calls on the suite's small case with no sync inside (synchronized
before, untimed).

    python -m pytest bench --benchmark-enable [--benchmark-json results.json]
    CUPY_OPS_VLLM_ANCHOR=.anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz python -m pytest bench --benchmark-enable

Helpers (inputs, graph capture, providers) come from cupy_ops._bench, which `python -m cupy_ops bench` also uses.
"""

from __future__ import annotations

import os

import pytest
import torch

from cupy_ops import _bench

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_TIME = [(op, case) for op, suite in _bench.SUITES.items() for case in suite.cases(True)]
EAGER = [(op, name) for op, suite in _bench.SUITES.items() for name in suite.eager_providers]
ROUNDS = 30
EAGER_CALLS_PER_ROUND = 200
# A round lasts ~2 ms (up to 1024 calls), so graph launch and sync (~10-20 µs of host time) stay ~1%.
ROUND_TARGET_US = 2000.0


@pytest.fixture(scope="session")
def vllm_ops():
    """vLLM's ops from $CUPY_OPS_VLLM_ANCHOR, or None when it is unset or does not load (why: in skips)."""
    path = os.environ.get("CUPY_OPS_VLLM_ANCHOR")
    ops, error = _bench.try_load_vllm(path)
    return ops, (error if path else "CUPY_OPS_VLLM_ANCHOR is not set")


@pytest.mark.parametrize("provider", ["cupy_ops", "torch", "vllm"])
@pytest.mark.parametrize("op, case", GPU_TIME, ids=[f"{op}-{case}" for op, case in GPU_TIME])
def test_gpu_time(benchmark, op, case, provider, vllm_ops):
    suite, (ops, why) = _bench.SUITES[op], vllm_ops
    sets = _bench.make_input_sets(suite.make_inputs, case, _bench.l2_cache_bytes())
    if provider == "torch":
        provider, fn, _ = _bench.compile_torch_baseline(suite.reference_into, sets[0])
    else:
        fn = suite.providers(case, ops).get(provider)
        if fn is None:
            pytest.skip(f"vLLM anchor unavailable ({why}) or not applicable to this case")
    calls = _bench.calls_per_graph(len(sets), case.bytes_moved, target_us=ROUND_TARGET_US, max_calls=1024)
    graph = _bench.capture_rotated(fn, sets, calls)

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=ROUNDS, warmup_rounds=3)
    benchmark.extra_info.update(op=op, provider=provider, case=str(case), bytes_per_call=case.bytes_moved,
                                calls_per_round=calls, input_sets=len(sets))
    if benchmark.stats is not None:  # None under --benchmark-disable
        us = benchmark.stats.stats.median * 1e6 / calls
        benchmark.extra_info.update(us_per_call=us, GBps=case.bytes_moved / (us * 1e3))


@pytest.mark.parametrize("op, provider", EAGER, ids=[f"{op}-{name}" for op, name in EAGER])
def test_eager_host_cost(benchmark, op, provider, vllm_ops):
    """Host µs per eager call; vLLM's op is timed beside ours as the same-moment reference."""
    ops, why = vllm_ops
    calls = _bench.SUITES[op].eager_calls(ops)
    if provider not in calls:
        pytest.skip(f"vLLM anchor unavailable: {why}")
    fn, args = calls[provider]
    fn(*args)  # compile and load outside the timing
    torch.cuda.synchronize()

    def loop():
        for _ in range(EAGER_CALLS_PER_ROUND):
            fn(*args)

    # The untimed sync before each round empties the launch queue, so host time never waits on the GPU.
    benchmark.pedantic(loop, setup=torch.cuda.synchronize, rounds=ROUNDS, warmup_rounds=2)
    torch.cuda.synchronize()
    benchmark.extra_info.update(op=op, provider=provider, case=_bench.SUITES[op].small_case,
                                calls_per_round=EAGER_CALLS_PER_ROUND)
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median * 1e6 / EAGER_CALLS_PER_ROUND
