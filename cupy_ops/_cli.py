"""`python -m cupy_ops {info,warmup,check,bench}`: what is installed, compile everything, self-check, roofline."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import cupy_ops
from cupy_ops import _runtime
from cupy_ops._runtime import compiler
from cupy_ops.ops import ALL_OPS, op_module


def _gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _versions() -> dict[str, str]:
    info = {
        "cupy_ops": cupy_ops.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
    }
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception as exc:  # CuPy missing: the CPU references still work
        info["cupy"] = f"not importable ({type(exc).__name__})"
    try:
        info["NVRTC"] = ".".join(map(str, compiler.nvrtc_version()))
    except Exception as exc:
        info["NVRTC"] = f"not found ({type(exc).__name__})"
    try:
        info["CUDA headers"] = f"{compiler.cuda_include_dir()} (CUDART_VERSION {compiler._cuda_headers_version()})"
    except Exception as exc:
        info["CUDA headers"] = f"not found ({exc})"
    return info


def _cache_summary() -> str:
    folder = compiler.cache_dir()
    entries = list(folder.glob("*.bin")) if folder.is_dir() else []
    size = sum(p.stat().st_size for p in entries)
    return f"{folder} ({len(entries)} kernels, {size / 1e6:.1f} MB)"


def cmd_info(args: argparse.Namespace) -> int:
    rows = _versions()
    if _gpu_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows[f"GPU {index}"] = (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                                    f"{props.total_memory / 2**30:.0f} GiB")
        from cupy.cuda import runtime

        rows["CUDA driver"] = str(runtime.driverGetVersion())
    else:
        rows["GPU"] = "none found (CPU references and NVRTC compile checks still work)"
    rows["kernel sources"] = str(compiler.kernel_dir())
    rows["kernel cache"] = _cache_summary()
    rows["ops"] = ", ".join(f"torch.ops.cupy_ops.{name}" for name in ALL_OPS)
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _all_instantiations() -> list[tuple[str, str]]:
    return [item for name in ALL_OPS for item in op_module(name).instantiations()]


def _progress(done: int, total: int, started: float, label: str) -> None:
    if not sys.stderr.isatty():
        return  # a log file gets the summary line only
    filled = int(30 * done / total) if total else 30
    bar = "#" * filled + "." * (30 - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} {time.time() - started:5.1f}s {label:<60.60}")
    sys.stderr.flush()


def cmd_warmup(args: argparse.Namespace) -> int:
    if args.arch is not None:
        arch = args.arch
    elif _gpu_available():
        arch = _runtime.device_arch(torch.cuda.current_device())
    else:
        print("no CUDA GPU found: pass --arch (e.g. --arch 90) to fill the cache for another machine's GPU")
        return 2
    target, native = compiler.supported_arch(arch)
    items = _all_instantiations()
    started = time.time()
    for done, (source, name) in enumerate(items):
        _progress(done, len(items), started, name)
        compiler.compile_kernel(source, name, target, native=native)
    _progress(len(items), len(items), started, "done")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"compiled {len(items)} kernels for sm_{target} in {time.time() - started:.1f}s; cache: {_cache_summary()}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    gpu = _gpu_available()
    device = "cuda" if gpu else "cpu"
    rows: list[tuple[str, str, bool, str]] = []
    if not gpu:
        print("no CUDA GPU found: checking the CPU references and compiling every kernel with NVRTC instead")
    torch.manual_seed(args.seed)
    for name in ALL_OPS:
        module = op_module(name)
        for case, passed, detail in module.self_check(device):
            rows.append((name, case, passed, detail))
    if not gpu:
        for arch in (80, 90):
            for source, expr in _all_instantiations():
                try:
                    report = compiler.ptxas_report(source, expr, arch)
                    passed = report.spill_stores == 0 and report.spill_loads == 0
                    detail = f"{report.registers} registers, {report.spill_stores} B spilled"
                except compiler.CompileError as exc:
                    passed, detail = False, str(exc).splitlines()[0]
                rows.append(("nvrtc", f"sm_{arch} {expr}", passed, detail))
    width = max(len(f"{op} {case}") for op, case, _, _ in rows)
    for op, case, passed, detail in rows:
        print(f"{'PASS' if passed else 'FAIL'}  {f'{op} {case}':<{width}}  {detail}")
    failed = sum(not passed for _, _, passed, _ in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cupy_ops import _bench

    return _bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cupy_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU and arch, NVRTC, kernel cache").set_defaults(func=cmd_info)
    warm = sub.add_parser("warmup", help="compile every kernel for this GPU (or --arch) into the disk cache")
    warm.add_argument("--arch", type=int, default=None, help="compute capability, e.g. 90 (default: this GPU)")
    warm.set_defaults(func=cmd_warmup)
    check = sub.add_parser("check", help="every op against its reference on random data; pass/fail table")
    check.add_argument("--seed", type=int, default=int(os.environ.get("CUPY_OPS_SEED", "0")))
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="roofline table: us, GB/s, %% of copy bandwidth, ratio to torch and vLLM")
    from cupy_ops import _bench

    _bench.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
