"""Roofline benchmarks: `python -m cupy_ops bench` calls `add_arguments` and `run`; bench/ imports the helpers.

GPU µs per call from CUDA-graph replays over rotated inputs, against measured copy bandwidth, vLLM's kernel
(optional anchor) and a torch.compile'd reference; eager host µs per call; cold and warm-cache first-call ms.
Each op has an `OpSuite` in its own module here (cases stating their bytes moved, inputs, providers, float64
reference); `SUITES` finds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import importlib
import pkgutil

from .harness import (
    NO_GPU_MESSAGE,
    OpSuite,
    add_ratios,
    bench_case,
    calls_per_graph,
    capture_rotated,
    compile_times,
    compile_torch_baseline,
    eager_host_us,
    format_table,
    l2_cache_bytes,
    load_vllm_anchor,
    make_input_sets,
    measure_copy_bandwidth,
    plot_results,
    poison,
    run_meta,
    try_load_vllm,
)

__all__ = ["OpSuite", "SUITES", "add_arguments", "calls_per_graph", "capture_rotated", "compile_torch_baseline",
           "eager_host_us", "l2_cache_bytes", "load_vllm_anchor", "make_input_sets", "poison", "run",
           "try_load_vllm"]

# One module per op next to this file, each defining SUITE = OpSuite(op="<op name>", ...).
SUITES: dict[str, OpSuite] = {}
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "harness":
        _suite = importlib.import_module(f"{__name__}.{_module.name}").SUITE
        SUITES[_suite.op] = _suite
SUITES = dict(sorted(SUITES.items()))

# ---- command line ------------------------------------------------------------------------------------------

PROVIDERS = ("cupy_ops", "vllm", "torch")


def add_arguments(parser) -> None:
    """Options of `python -m cupy_ops bench` on an argparse (sub)parser."""
    parser.add_argument("--op", choices=sorted(SUITES), action="append",
                        help="op to benchmark (repeatable; default: all)")
    parser.add_argument("--vllm", metavar="PATH", help="vLLM anchor library (.so.xz) to compare with (optional)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--json", metavar="FILE", help="write meta and results (long format) to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of µs per case and provider (matplotlib)")
    parser.add_argument("--quick", action="store_true", help="3 cases, fewer repetitions, no 1 GiB copy")
    parser.add_argument("--no-compile-timing", action="store_true",
                        help="skip the cold/warm first-call timing in fresh subprocesses")
    parser.add_argument("--reps", type=int, default=None, help="graph replays timed per case (default 100; 20 quick)")
    parser.add_argument("--torch-eager", action="store_true",
                        help="time the torch baseline eagerly instead of under torch.compile (saves a compile a case)")


def _eager_host_costs(suite: OpSuite, vllm_ops, into: dict, label: str, rounds: int) -> None:
    for name, cost in eager_host_us(suite.eager_calls(vllm_ops), rounds=rounds).items():
        into[name + label] = cost


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    """Run the benchmarks named by `args`; print a summary and the table last; 0 ok, 1 a check or provider
    failed, 2 unusable setup (no GPU, bad option, matplotlib missing for --plot)."""
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    quick, plot, json_path, vllm_path = args.quick, args.plot, args.json, args.vllm
    wanted = {p.strip() for p in args.providers.split(",") if p.strip()}
    if not wanted or not wanted <= set(PROVIDERS):
        print(f"--providers must be a subset of {','.join(PROVIDERS)}, got {args.providers!r}", file=sys.stderr)
        return 2
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib (or cupy-ops[plot])", file=sys.stderr)
            return 2
    ops = args.op or list(SUITES)
    vllm_ops, vllm_error = try_load_vllm(vllm_path) if vllm_path else (None, None)
    if vllm_error:
        _log(f"vLLM anchor not loaded, benchmarking without it: {vllm_error}")
    if vllm_ops is None:
        wanted.discard("vllm")
    reps = args.reps or (20 if quick else 100)

    copy = measure_copy_bandwidth(256 << 20 if quick else 1 << 30, reps=10 if quick else 20)
    meta = run_meta(copy)
    meta["vllm_anchor"] = vllm_path if vllm_ops is not None else None
    meta["vllm_error"] = vllm_error
    _log(f"{meta['gpu']}: copy bandwidth {copy['GBps']:.0f} GB/s (read + write of {copy['bytes'] >> 20} MiB; "
         f"kernel {copy['kernel']['GBps']:.0f}, memcpy {copy['memcpy']['GBps']:.0f})")
    l2_bytes = l2_cache_bytes()

    rows: list[dict] = []
    eager: dict[str, dict] = {}
    compile_ms: dict[str, dict] = {}
    for op in ops:
        suite = SUITES[op]
        cases = suite.cases(quick)
        # Host cost in this process, and again after torch.compile has run (the torch baseline).
        eager[op] = {}
        rounds = 5 if quick else 21
        _eager_host_costs(suite, vllm_ops, eager[op], "", rounds=rounds)
        for i, case in enumerate(cases, 1):
            _log(f"[{op} {i}/{len(cases)}] {case.name} {case.dtype_name}")
            rows += bench_case(op, suite, case, vllm_ops, wanted, l2_bytes, reps, _log,
                               compile_baseline=not args.torch_eager)
        if "torch" in wanted and not args.torch_eager:
            _eager_host_costs(suite, vllm_ops, eager[op], " (after torch.compile)", rounds=rounds)
        if not args.no_compile_timing:
            compile_ms[op] = compile_times(suite)
    add_ratios(rows, copy["GBps"])

    for op in ops:
        host = ", ".join(f"{k} {v['us_median']:.1f}" if "us_median" in v else f"{k} error"
                         for k, v in eager[op].items())
        print(f"{op}: eager host µs/call ({SUITES[op].small_case}): {host}")
        c = compile_ms.get(op, {})
        if "warm_disk_first_call_ms" in c:
            print(f"{op}: first call ms ({c['case']}): cold compile {c['cold_first_call_ms']:.0f}, "
                  f"warm disk cache {c['warm_disk_first_call_ms']:.0f}")
        elif c:
            print(f"{op}: compile timing failed: {c.get('cold_error') or c.get('warm_disk_error')}")
    print(f"{meta['gpu']}, copy {copy['GBps']:.0f} GB/s, git {str(meta['git_sha'])[:10]}"
          f"{' (dirty)' if meta['git_dirty'] is True else ''}, vLLM {'yes' if vllm_ops is not None else 'no'}")
    print(format_table(rows))

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": rows, "eager_host_us": eager, "compile_ms": compile_ms}, f,
                      indent=1)
    if plot:
        plot_results(rows, plot, title=f"{meta['gpu']}, copy {copy['GBps']:.0f} GB/s")
    failed = any("error" in r or r.get("matches_ref") is False or r.get("matches_vllm") is False for r in rows)
    return 1 if failed else 0
