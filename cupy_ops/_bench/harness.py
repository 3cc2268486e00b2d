"""Benchmark harness shared by every op: environment, CUDA-graph timing, copy bandwidth, checks, report.

GPU µs per call from CUDA-graph replays over rotated inputs, against measured copy bandwidth, vLLM's kernel
(optional anchor) and a torch.compile'd reference; eager host µs per call; cold and warm-cache first-call ms.
Each op has an `OpSuite` (cases stating their bytes moved, inputs, providers, float64 reference) in its own
module of cupy_ops/_bench/.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import lzma
import math
import os
import random
import statistics
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import cupy_ops
from cupy_ops.testing import TOLERANCE

NO_GPU_MESSAGE = "no CUDA GPU found: bench needs one"
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM; used only when the device does not report its L2 size
_ROOT = Path(__file__).resolve().parents[2]  # the checkout or site-packages folder above cupy_ops/


# ---- environment -----------------------------------------------------------------------------------------


def load_vllm_anchor(xz_path: str, unpack_dir: str | None = None):
    """`torch.ops._C` with vLLM's compiled kernels, from the anchor .so.xz (same logic as shared/anchors)."""
    stat = os.stat(xz_path)
    # Keyed by size and mtime so that a different anchor file is never served from a stale unpack.
    unpack_dir = unpack_dir or os.path.join(tempfile.gettempdir(), f"cupy_ops_vllm_{stat.st_size}_{stat.st_mtime_ns}")
    target = os.path.join(unpack_dir, "_C_stable_libtorch.abi3.so")
    if not os.path.exists(target):
        os.makedirs(unpack_dir, exist_ok=True)
        part = f"{target}.{os.getpid()}.part"
        with lzma.open(xz_path) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, target)
    torch.ops.load_library(target)
    return torch.ops._C


def try_load_vllm(xz_path: str | None) -> tuple[Any, str | None]:
    """(vLLM ops or None, why not): the anchor is optional, so failing to load it is never an error."""
    if not xz_path:
        return None, "no anchor path given"
    try:
        ops = load_vllm_anchor(xz_path)
    except Exception as exc:  # noqa: BLE001 - missing file, wrong torch/CUDA ABI, noexec temp dir...
        return None, f"{type(exc).__name__}: {exc}"
    if not hasattr(ops, "merge_attn_states"):  # any of its ops: the library registers them all at once
        return None, f"{xz_path} loaded but registers no torch.ops._C ops"
    return ops, None


def l2_cache_bytes(device: int | None = None) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a version we cannot read is "unknown", not a failed run
        return "unknown"


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def run_meta(copy: dict) -> dict:
    """GPU, versions, git sha and the command line: what a results file needs to be compared with another."""
    import cupy

    from cupy_ops._runtime import compiler

    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2_cache_bytes(device),
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cupy": cupy.__version__,
        "cuda_runtime": _safe(cupy.cuda.runtime.runtimeGetVersion),
        "cuda_driver": _safe(cupy.cuda.runtime.driverGetVersion),
        "nvrtc": _safe(lambda: ".".join(map(str, compiler.nvrtc_version()))),
        "cupy_ops": cupy_ops.__version__,
        # A GPU machine may get a copy of the tree with no .git or a stale one: the caller passes the sha it ran.
        "git_sha": os.environ.get("CUPY_OPS_GIT_SHA") or _safe(lambda: _git("rev-parse", "HEAD")),
        "git_dirty": _safe(lambda: _git("rev-parse", "HEAD") and bool(_git("status", "--porcelain", "-uno"))),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": copy["GBps"],
        "copy_bandwidth": copy,
        "command": shlex.join([sys.executable, *sys.argv]),
    }


# ---- timing ----------------------------------------------------------------------------------------------


def calls_per_graph(sets: int, bytes_moved: int, *, target_us: float = 200.0, min_calls: int = 4,
                    max_calls: int = 512) -> int:
    """Calls in one graph: a multiple of `sets`, at least `min_calls`, and enough that a replay lasts about
    `target_us` (guessed as 2 µs + bytes at 2.5 TB/s), so its launch (a few µs) is a small part of it."""
    guess_us = 2.0 + bytes_moved / 2.5e6
    want = min(max_calls, max(min_calls, math.ceil(target_us / guess_us)))
    return sets * math.ceil(want / sets)


def make_input_sets(make_inputs: Callable[[Any, int], tuple], case, l2_bytes: int, *,
                    min_sets: int = 2, max_sets: int = 128) -> list[tuple]:
    """`make_inputs(case, seed)` for enough seeds that one pass over the sets reads >= 2x L2 (every call then
    starts from cold L2), within [min_sets, max_sets] and 40% of free memory."""
    sets = max(min_sets, min(max_sets, -(-2 * l2_bytes // max(1, case.input_bytes))))
    free_bytes = torch.cuda.mem_get_info()[0]
    sets = max(1, min(sets, int(0.4 * free_bytes // max(1, case.bytes_moved))))
    return [make_inputs(case, seed) for seed in range(sets)]


def capture_rotated(fn: Callable, input_sets: list[tuple], calls: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of `calls` calls `fn(*input_sets[i % len(input_sets)])`; warmed up (compile, load,
    autotune) on a side stream first, as torch requires before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in input_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    return graph


def time_replays(graph: torch.cuda.CUDAGraph, reps: int, warmup: int = 3) -> list[float]:
    """Milliseconds per replay, CUDA events around each; replays queued back to back, one sync at the end."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def summarize_us(replay_ms: list[float], calls: int) -> dict:
    """µs per call: median, p20, p80 over replays."""
    per_call = [ms * 1e3 / calls for ms in replay_ms]
    deciles = statistics.quantiles(per_call, n=10, method="inclusive")  # 9 cut points: 10%, 20%, ... 90%
    return {"us_median": statistics.median(per_call), "us_p20": deciles[1], "us_p80": deciles[7]}


def measure_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Device-to-device copy of `nbytes` (random float32), GB/s counting bytes read plus written (median), by
    cudaMemcpy (`dst.copy_`) and by an SM kernel (`src * 1` into dst); "GBps" is the faster. On an H100
    (2026-11-25) memcpy fell from 2990 to 2430 GB/s above 256 MiB while the kernel held 3010 up to 1 GiB."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    result: dict[str, Any] = {"bytes": 2 * nbytes}
    for label, fn in (("memcpy", lambda out, inp: out.copy_(inp)),
                      ("kernel", lambda out, inp: torch.mul(inp, 1.0, out=out))):
        graph = capture_rotated(fn, [(dst, src)], 4)
        timing = summarize_us(time_replays(graph, reps), 4)
        result[label] = {"GBps": 2 * nbytes / (timing["us_median"] * 1e3), **timing}
        del graph
    del src, dst
    torch.cuda.empty_cache()
    result["GBps"] = max(result["memcpy"]["GBps"], result["kernel"]["GBps"])
    return result


def eager_calls_for(op, args: tuple, vllm_call: Callable | None = None) -> dict[str, tuple[Callable, tuple]]:
    """{name: (fn, args)} for `OpSuite.eager_calls`: our eager call (`op.public`), the dispatcher's (`op.overload`)
    and, given, vLLM's."""
    calls = {"cupy_ops": (op.public, args), "cupy_ops_dispatcher": (op.overload, args)}
    if vllm_call is not None:
        calls["vllm"] = (vllm_call, args)
    return calls


def eager_host_us(calls: dict[str, tuple[Callable, tuple]], *, calls_per_round: int = 500,
                  rounds: int = 15) -> dict[str, dict]:
    """Host µs per eager call of each {name: (fn, args)}: perf_counter around `calls_per_round` calls with no
    sync inside (a tiny case, so the GPU keeps up and the launch queue never fills). The providers take turns
    in a shuffled order each round, so clock and VM drift fall on all alike; median and min over the rounds.
    A provider whose first call raises gets {"error": ...}."""
    results: dict[str, dict] = {}
    timed = {}
    for name, (fn, args) in calls.items():
        try:
            for _ in range(1000):  # warm caches and clocks
                fn(*args)
            torch.cuda.synchronize()
            timed[name] = (fn, args)
        except Exception as exc:  # noqa: BLE001 - a provider failing is reported, not fatal
            results[name] = {"error": _describe(exc)}
    samples: dict[str, list[float]] = {name: [] for name in timed}
    order = list(timed)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn, args = timed[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn(*args)
            samples[name].append((time.perf_counter() - start) / calls_per_round * 1e6)
    torch.cuda.synchronize()
    for name, per_call in samples.items():
        results[name] = {"us_median": statistics.median(per_call), "us_min": min(per_call),
                         "calls": calls_per_round, "rounds": rounds}
    return {name: results[name] for name in calls}


def compare(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    """(all close, max abs difference); equal infinities agree, NaN never does."""
    a, e = actual.float(), expected.float()
    close = bool(torch.isclose(a, e, rtol=rtol, atol=atol).all())
    if a.numel() == 0:
        return close, 0.0
    diff = torch.where(a == e, torch.zeros_like(a), (a - e).abs()).nan_to_num(nan=math.inf)
    return close, float(diff.max())


def compile_torch_baseline(reference_into: Callable, sample_args: tuple) -> tuple[str, Callable, str | None]:
    """("torch", torch.compile(reference_into), None), or ("torch-eager", reference_into, error) when compiling
    or running the compiled function fails. Dynamo is reset first: a fresh compile per case, static shapes."""
    torch._dynamo.reset()
    compiled = torch.compile(reference_into, dynamic=False)
    try:
        compiled(*sample_args)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any compile failure means: time the eager reference
        torch._dynamo.reset()
        return "torch-eager", reference_into, _describe(exc)
    return "torch", compiled, None



def poison(*tensors: torch.Tensor | None) -> None:
    """All bits set: NaN in every float format here, so an element the op does not write fails the check."""
    for t in tensors:
        if t is not None:
            t.view(torch.uint8).fill_(0xFF)


@dataclasses.dataclass(frozen=True)
class OpSuite:
    """How to benchmark one op. Cases have .name .shape .dtype_name .input_bytes .bytes_moved (which is also
    the device memory of one input set); args are the op's positional arguments (one input set)."""

    op: str                                                # the op's name (cupy_ops.ops.ops() key)
    cases: Callable[[bool], list]                          # quick -> cases
    make_inputs: Callable[[Any, int], tuple]               # (case, seed) -> args
    providers: Callable[[Any, Any], dict[str, Callable]]   # (case, vLLM ops or None) -> {name: fn(*args)}
    reference_into: Callable                               # fn(*args) writing the fp32 reference: torch baseline
    outputs: Callable[[tuple], tuple]                      # args -> tensors the op writes
    gold: Callable[[tuple], tuple]                         # args -> float64 reference of those tensors
    output_dtypes: Callable[[Any], tuple]                  # case -> dtype per output: testing.TOLERANCE
    eager_calls: Callable[[Any], dict]                     # vLLM ops or None -> {name: (fn, args)}
    eager_providers: tuple[str, ...]                       # the names eager_calls can return
    compile_probe: str                                     # child code printing {"first_call_ms": ...}
    small_case: str                                        # what eager_calls and compile_probe run on
    # (case, args, outputs, expected outputs, loose) -> (agree?, worst difference); default: testing.TOLERANCE
    # by output dtype. Ops whose outputs are not values (top-k indices) bring their own.
    agree: Callable | None = None


# ---- one op, end to end -------------------------------------------------------------------------------------


def _agreement(suite: OpSuite, case, args: tuple, got: tuple, want: tuple, *,
               loose: bool = False) -> tuple[bool, float]:
    """All outputs within testing.TOLERANCE (or the suite's own `agree`). `loose` (2x rtol, atol >= rtol) for
    two fp32-math kernels that may order operations differently (vLLM): near-zero results of a cancelling sum
    differ by a few ulps of the operands, not of the result."""
    if suite.agree is not None:
        return suite.agree(case, args, got, want, loose)
    ok, worst = True, 0.0
    for g, w, dtype in zip(got, want, suite.output_dtypes(case)):
        rtol, atol = TOLERANCE[dtype]
        close, diff = compare(g, w, 2 * rtol if loose else rtol, max(atol, rtol) if loose else atol)
        ok, worst = ok and close, max(worst, diff)
    return ok, worst


def bench_case(op: str, suite: OpSuite, case, vllm_ops, wanted: set[str], l2_bytes: int, reps: int,
               log: Callable[[str], None], compile_baseline: bool = True) -> list[dict]:
    """Rows (one per provider) for one case: correctness against vLLM and float64, then graph timing."""
    sets = make_input_sets(suite.make_inputs, case, l2_bytes)
    providers = {k: v for k, v in suite.providers(case, vllm_ops).items() if k in wanted}
    compile_error = None
    if "torch" in wanted and compile_baseline:
        label, fn, compile_error = compile_torch_baseline(suite.reference_into, sets[0])
        providers[label] = fn
    elif "torch" in wanted:
        providers["torch-eager"] = suite.reference_into
    if compile_error:
        log(f"  torch.compile failed, timing the eager reference: {compile_error}")
    calls = calls_per_graph(len(sets), case.bytes_moved)
    base = {"op": op, "case": f"{case.name} {case.dtype_name}", "shape": list(case.shape),
            "dtype": case.dtype_name, "bytes": case.bytes_moved, "input_sets": len(sets),
            "calls_per_graph": calls, "reps": reps}
    floors = getattr(case, "floors_us", None)  # a case may state its floors (exp throughput, bytes) in µs
    if floors:
        base["floors_us"] = dict(floors)
    # Checks run on fresh copies of the first input set (seed 0): in-place ops overwrite their inputs.
    gold = suite.gold(suite.make_inputs(case, 0))
    outputs: dict[str, tuple] = {}
    rows = []
    for name in sorted(providers, key=lambda k: k != "vllm"):  # vLLM first: the others compare with it
        fn = providers[name]
        row = dict(base, provider=name)
        if name == "torch-eager":
            row["torch_compile_error"] = compile_error
        try:
            args = suite.make_inputs(case, 0)
            fn(*args)
            outputs[name] = tuple(t.clone() for t in suite.outputs(args))
            row["matches_ref"], row["max_abs_diff_ref"] = _agreement(suite, case, args, outputs[name], gold)
            if "vllm" in outputs and name != "vllm":
                row["matches_vllm"], row["max_abs_diff_vllm"] = _agreement(suite, case, args, outputs[name],
                                                                           outputs["vllm"], loose=True)
            del args
            graph = capture_rotated(fn, sets, calls)
            row.update(summarize_us(time_replays(graph, reps), calls))
            del graph
            row["GBps"] = case.bytes_moved / (row["us_median"] * 1e3)
        except Exception as exc:  # noqa: BLE001 - one provider failing must not lose the others' numbers
            row["error"] = _describe(exc)
            log(f"  {name}: {row['error']}")
        rows.append(row)
    del sets, gold, outputs
    torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict], copy_GBps: float) -> None:
    """% of copy bandwidth, and time ratios (baseline µs / this row's µs: > 1 means this row is faster)."""
    by_case: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if "us_median" in row:
            by_case.setdefault((row["op"], row["case"]), {})[row["provider"]] = row["us_median"]
    for row in rows:
        if "us_median" not in row:
            continue
        row["pct_copy_bw"] = 100.0 * row["GBps"] / copy_GBps
        times = by_case[row["op"], row["case"]]
        torch_us = times.get("torch", times.get("torch-eager"))  # the compiled reference, else the eager one
        row["ratio_vs_vllm"] = times["vllm"] / row["us_median"] if "vllm" in times else None
        row["ratio_vs_torch"] = torch_us / row["us_median"] if torch_us else None


def _child_env(**overrides: str) -> dict[str, str]:
    """This process's environment plus `overrides`, with this checkout first on PYTHONPATH: for child probes."""
    env = dict(os.environ, **overrides)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


def first_call_probe(op: str, make_args: str) -> str:
    """Child code (`OpSuite.compile_probe`) printing the ms of the first and the second call of
    `cupy_ops.<op>(*args)` in a fresh process; `make_args` is the code that sets `args`."""
    return f"""
import json, time, torch
{make_args}
import cupy_ops
torch.cuda.synchronize()
t0 = time.perf_counter()
cupy_ops.{op}(*args)
torch.cuda.synchronize()
t1 = time.perf_counter()
cupy_ops.{op}(*args)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({{"first_call_ms": (t1 - t0) * 1e3, "second_call_ms": (t2 - t1) * 1e3}}))
"""


def compile_times(suite: OpSuite) -> dict:
    """First-call ms in a fresh process with an empty CUPY_OPS_CACHE_DIR (cold: NVRTC compile), then in
    another fresh process with the same folder (warm disk cache); the child measures itself."""
    result: dict[str, Any] = {"case": suite.small_case}
    with tempfile.TemporaryDirectory(prefix="cupy_ops_bench_cache_") as cache:
        env = _child_env(CUPY_OPS_CACHE_DIR=cache)
        for label in ("cold", "warm_disk"):
            child = subprocess.run([sys.executable, "-c", suite.compile_probe], env=env, capture_output=True,
                                   text=True, timeout=600, check=False)
            lines = child.stdout.strip().splitlines()
            if child.returncode != 0 or not lines:
                result[f"{label}_error"] = (child.stderr or child.stdout).strip()[-500:]
                break
            measured = json.loads(lines[-1])
            result[f"{label}_first_call_ms"] = measured["first_call_ms"]
            result[f"{label}_second_call_ms"] = measured["second_call_ms"]
    return result


# ---- report ------------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """One line per case x provider; check: ok, or what disagreed (ref: float64 reference, vllm: vLLM)."""
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    header = ("op", "shape", "dtype", "provider", "us median (p20-p80)", "GB/s", "%copy", "floor us", "vs vllm",
              "vs torch", "check")
    lines = [header]
    for r in rows:
        if "us_median" not in r:
            lines.append((r["op"], r["case"].split()[0], r["dtype"], r["provider"], "error", "-", "-", "-", "-", "-",
                          r.get("error", "")[:40]))
            continue
        bad = [k for k in ("ref", "vllm") if r.get(f"matches_{k}") is False]
        lines.append((r["op"], r["case"].split()[0], r["dtype"], r["provider"],
                      f"{r['us_median']:.2f} ({r['us_p20']:.2f}-{r['us_p80']:.2f})", f"{r['GBps']:.0f}",
                      f"{r['pct_copy_bw']:.0f}%", _floor(r), ratio(r["ratio_vs_vllm"]), ratio(r["ratio_vs_torch"]),
                      "DIFF " + ",".join(bad) if bad else "ok"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def _floor(row: dict) -> str:
    """The case's own floor (the largest of its computed floors: exp throughput, bytes), else "-"."""
    floors = [v for k, v in row.get("floors_us", {}).items() if not k.startswith("vllm")]
    return f"{max(floors):.1f}" if floors else "-"


def plot_results(rows: list[dict], path: str, title: str = "") -> None:
    """Grouped bars: µs per call (median, p20-p80 whiskers, log scale) per case, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "us_median" in r]
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(cases)), 5.0))
    for i, provider in enumerate(providers):
        mine = {(r["op"], r["case"]): r for r in rows if r["provider"] == provider}
        xs = [j + i * width for j, key in enumerate(cases) if key in mine]
        picked = [mine[key] for key in cases if key in mine]
        med = [r["us_median"] for r in picked]
        err = [[r["us_median"] - r["us_p20"] for r in picked], [r["us_p80"] - r["us_median"] for r in picked]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    several_ops = len({op for op, _ in cases}) > 1
    ax.set_xticklabels([f"{op}\n{case}" if several_ops else case for op, case in cases], rotation=30,
                       ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (CUDA-graph replay median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

