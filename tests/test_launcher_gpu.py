"""The launcher's features on the GPU, each with a probe kernel that reports how it ran (example_op/launch_probe.cu):
3-D grids and blocks, dynamic shared memory above 48 KiB, thread-block clusters (sm_90), the occupancy query (all
blocks it promises are resident at once), stream-ordered memset, all inside CUDA-graph capture and replay; and a
warm-cache process that meets new shapes while its first launches are still young (the bug where a background
import of CuPy made such calls fail)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import gpu, requires_cuda

from cupy_ops._runtime import launcher
from cupy_ops._runtime.launcher import Kernel, LaunchConfig
from cupy_ops._runtime.params import CStruct, i64, ptr

pytestmark = [gpu, requires_cuda]

PROBE = Kernel("launch_probe.cu", "launch_probe::probe_kernel", root=Path(__file__).parent / "example_op")
PARAMS = CStruct("ProbeParams", [ptr("out"), ptr("counter"), ptr("failures"), i64("shared_words"),
                                 i64("spin_cycles")])


def _probe(config: LaunchConfig, *, spin_cycles: int = 0, stream=None):
    """Launch the probe once with `config`; returns (out [blocks, threads, 4] int64, failures, the buffers)."""
    device = torch.cuda.current_device()
    out = torch.full((config.blocks * config.threads * 4,), -1, dtype=torch.int32, device="cuda")
    counter = torch.zeros(2, dtype=torch.int32, device="cuda")
    runner = launcher.Launcher(PROBE, device, config)
    stream = torch.cuda.current_stream().cuda_stream if stream is None else stream
    tail = PARAMS.pack({"shared_words": config.shared_bytes // 4, "spin_cycles": spin_cycles})
    runner.launch(stream, PARAMS.pack_into, (out.data_ptr(), counter.data_ptr(), counter.data_ptr() + 4, tail))
    return out, counter


def _report(out: torch.Tensor, config: LaunchConfig) -> torch.Tensor:
    return out.view(config.blocks, config.threads, 4).to(torch.int64) & 0xFFFFFFFF


def test_3d_grid_and_block_cover_every_thread_once():
    config = LaunchConfig((3, 2, 5), (8, 4, 2))
    out, _ = _probe(config)
    torch.cuda.synchronize()
    report = _report(out, config)
    assert torch.equal(report[:, :, 0], torch.arange(config.blocks, device="cuda")[:, None].expand(-1, 64))
    assert torch.equal(report[:, :, 1], torch.arange(64, device="cuda")[None, :].expand(config.blocks, -1))


@pytest.mark.parametrize("kib", [1, 44, 100, 200])
def test_dynamic_shared_memory_above_48_kib(kib):
    """Every word of the requested dynamic shared memory is written and read back by every block (the probe also
    has 8 KiB of static shared memory: a launch without the opt-in fails above 40 KiB of dynamic memory; memcheck
    sees a word out of reach)."""
    limit = launcher.device_attribute(torch.cuda.current_device(), "max_shared_memory_per_block_optin")
    if kib * 1024 > limit:
        pytest.skip(f"this GPU allows {limit} bytes of shared memory per block")
    config = LaunchConfig((4, 1, 1), (256, 1, 1), shared_bytes=kib * 1024)
    out, _ = _probe(config)
    torch.cuda.synchronize()
    assert bool((_report(out, config)[:, :, 1] != 0xFFFFFFFF).all()), "a shared-memory word read back wrong"


def test_shared_memory_beyond_the_device_limit_is_refused():
    limit = launcher.device_attribute(torch.cuda.current_device(), "max_shared_memory_per_block_optin")
    with pytest.raises(ValueError, match="asks for .* bytes of dynamic shared memory"):
        launcher.Launcher(PROBE, torch.cuda.current_device(), LaunchConfig((1, 1, 1), (32, 1, 1), limit + 1024))


@pytest.mark.parametrize("cluster", [(2, 1, 1), (4, 1, 1), (2, 2, 1)])
def test_clusters_of_blocks(cluster):
    if launcher.device_arch(torch.cuda.current_device()) < 90:
        pytest.skip("thread-block clusters need sm_90")
    config = LaunchConfig((8, 2, 1), (64, 1, 1), 0, cluster)
    out, _ = _probe(config)
    torch.cuda.synchronize()
    report = _report(out, config)
    size = cluster[0] * cluster[1] * cluster[2]
    assert bool((report[:, :, 3] == size).all())
    ranks = report[:, 0, 2].view(2, 8)  # [grid y, grid x]: rank = x % cx + cx * (y % cy)
    x, y = torch.arange(8, device="cuda")[None, :], torch.arange(2, device="cuda")[:, None]
    assert torch.equal(ranks, x % cluster[0] + cluster[0] * (y % cluster[1]))
    clusters = launcher.max_active_clusters(PROBE, torch.cuda.current_device(), config)
    assert clusters >= 1


@pytest.mark.parametrize("threads, kib", [(1024, 0), (1024, 100), (256, 64)])
def test_occupancy_promises_co_resident_blocks(threads, kib):
    """occupancy x SMs blocks of the exact kernel all wait at a global barrier: every one must arrive (an
    over-estimate leaves some unscheduled and the others time out, as vLLM's persistent top-k deadlocked)."""
    device = torch.cuda.current_device()
    per_sm = launcher.occupancy(PROBE, device, threads, kib * 1024)
    assert per_sm >= 1
    blocks = per_sm * launcher.device_attribute(device, "sm_count")
    config = LaunchConfig((blocks, 1, 1), (threads, 1, 1), kib * 1024)
    _, counter = _probe(config, spin_cycles=2_000_000_000)  # ~1 s at 2 GHz
    torch.cuda.synchronize()
    assert int(counter[0]) == blocks and int(counter[1]) == 0, f"{int(counter[1])} blocks timed out"


def test_memset_and_launch_in_a_cuda_graph():
    """A memset of part of a buffer and a cluster launch with dynamic shared memory, captured once, replayed
    twice: each replay sets the bytes again and relaunches (the buffer is dirtied between replays)."""
    device = torch.cuda.current_device()
    cluster = (2, 1, 1) if launcher.device_arch(device) >= 90 else None
    config = LaunchConfig((4, 1, 1), (128, 1, 1), 64 * 1024, cluster)
    buffer = torch.zeros(64, dtype=torch.uint8, device="cuda")
    out = torch.full((config.blocks * config.threads * 4,), -1, dtype=torch.int32, device="cuda")
    counter = torch.zeros(2, dtype=torch.int32, device="cuda")
    runner = launcher.Launcher(PROBE, device, config)
    tail = PARAMS.pack({"shared_words": config.shared_bytes // 4, "spin_cycles": 0})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stream = torch.cuda.current_stream().cuda_stream
        launcher.memset_async(buffer.data_ptr() + 8, 0xAB, 40, stream, device)
        runner.launch(stream, PARAMS.pack_into, (out.data_ptr(), counter.data_ptr(), counter.data_ptr() + 4, tail))
    for _ in range(2):
        buffer.fill_(7)
        out.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        want = torch.full((64,), 7, dtype=torch.uint8, device="cuda")
        want[8:48] = 0xAB
        assert torch.equal(buffer, want)
        assert bool((_report(out, config)[:, :, 1] != 0xFFFFFFFF).all())


def test_a_fresh_warm_cache_process_takes_new_shapes_from_its_first_call(tmp_path):
    """A new process whose kernels are all on disk calls merge_attn_states with a new shape each time for 2.5 s
    from its first call, and at least 20 times: every call succeeds (CuPy was imported in a background thread
    here before, and calls that met its half-built module failed), and none imports CuPy. (A count as well as a
    time: under compute-sanitizer the first call alone took the 2.5 s.)"""
    env = dict(os.environ, CUPY_OPS_CACHE_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = textwrap.dedent("""
        import sys, time, torch, cupy_ops
        def call(n):
            x = torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16)
            lse = torch.randn(4, n, device="cuda")
            cupy_ops.merge_attn_states(torch.empty_like(x), torch.empty_like(lse), x, lse, x.clone(), lse.clone())
        if sys.argv[1] == "fill":
            for n in range(1, 40):
                call(n)
        else:
            failures, calls, start, n = 0, 0, time.perf_counter(), 40
            while time.perf_counter() - start < 2.5 or calls < 20:
                n += 1
                try:
                    call(n)
                except Exception as exc:
                    failures += 1
                    print(repr(exc), file=sys.stderr)
                calls += 1
            torch.cuda.synchronize()
            print(calls, failures, "cupy" in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script, "fill"], env=env, check=True, timeout=600)
    done = subprocess.run([sys.executable, "-c", script, "run"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    calls, failures, cupy_imported = done.stdout.split()
    assert int(calls) >= 20 and int(failures) == 0, done.stderr
    assert cupy_imported == "False"
