"""`python -m cupy_ops {info,warmup,check,bench}` (also the `cupy-ops` command): what is installed, compile every
kernel, self-check, roofline benchmarks."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import cupy_ops
from cupy_ops._runtime import compiler, launcher
from cupy_ops.ops import kernels, ops

# The oldest arch the kernels target (bf16 and fp8 conversions, cp.async): sm_80.
MIN_ARCH = 80
_NO_NVRTC = ("NVRTC and the CUDA headers come with CuPy's extra for your CUDA major: "
             "pip install 'cupy-ops[cuda13]' (or 'cupy-ops[cuda12]')")


def _gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _nvrtc_problem() -> str | None:
    """None when kernels can be compiled here, else why not and what to install."""
    try:
        compiler._nvrtc()
        compiler.nvrtc_version()
        compiler.cuda_include_dir()
    except (ImportError, OSError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}. {_NO_NVRTC}"
    return None


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
    except ImportError as exc:
        info["cupy"] = f"not installed ({exc}); {_NO_NVRTC}"
    try:
        info["NVRTC"] = ".".join(map(str, compiler.nvrtc_version()))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        info["NVRTC"] = f"not found ({type(exc).__name__})"
    try:
        info["CUDA headers"] = f"{compiler.cuda_include_dir()} (CUDART_VERSION {compiler._cuda_headers_version()})"
    except Exception as exc:  # noqa: BLE001
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
    else:
        problem = _nvrtc_problem()
        rows["GPU"] = ("none found: the CPU references run, and NVRTC compile checks "
                       + ("work" if problem is None else "need NVRTC, which is missing"))
    rows["kernel sources"] = str(compiler.kernel_dir())
    rows["kernel cache"] = _cache_summary()
    rows["ops"] = ", ".join(f"torch.ops.cupy_ops.{name}" for name in ops())
    rows["commands"] = "python -m cupy_ops (or cupy-ops) info | warmup | check | bench"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _selected_ops(names: list[str] | None) -> dict:
    """The registry's ops, or those named (`--op`, repeatable)."""
    every = ops()
    return every if not names else {name: every[name] for name in names}


def _progress(done: int, total: int, started: float, label: str) -> None:
    if not sys.stderr.isatty():
        return  # a log file gets the summary line only
    filled = int(30 * done / total) if total else 30
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {time.time() - started:5.1f}s "
                     f"{label:<60.60}")
    sys.stderr.flush()


def _arch_error(arch: int) -> str | None:
    supported = compiler._nvrtc_archs()
    if arch < MIN_ARCH:
        return f"--arch {arch}: cupy_ops kernels need sm_{MIN_ARCH} or newer (bf16 and fp8 conversions)"
    if supported and arch not in supported and arch < max(supported):  # newer GPUs get PTX, as at run time
        return (f"--arch {arch}: this NVRTC ({'.'.join(map(str, compiler.nvrtc_version()))}) compiles for "
                f"{', '.join(f'sm_{a}' for a in supported if a >= MIN_ARCH)} (and PTX for newer GPUs)")
    return None


def cmd_warmup(args: argparse.Namespace) -> int:
    problem = _nvrtc_problem()
    if problem:
        print(f"cannot compile: {problem}", file=sys.stderr)
        return 2
    if args.arch is not None:
        error = _arch_error(args.arch)
        if error:
            print(error, file=sys.stderr)
            return 2
        arch = args.arch
    elif _gpu_available():
        arch = launcher.device_arch(torch.cuda.current_device())
    else:
        print("no CUDA GPU found: pass --arch (e.g. --arch 90) to fill the cache for another machine's GPU",
              file=sys.stderr)
        return 2
    target, native = compiler.supported_arch(arch)
    every = kernels()
    started, compiled = time.time(), 0
    for done, kernel in enumerate(every):
        _progress(done, len(every), started, kernel.name_expression)
        before = compiler.compile_count()
        compiler.compile_kernel(kernel.source, kernel.name_expression, target, native=native, root=kernel.root)
        compiled += compiler.compile_count() - before
    _progress(len(every), len(every), started, "done")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"{len(every)} kernels for sm_{target}{'' if native else ' (PTX)'}: {compiled} compiled, "
          f"{len(every) - compiled} already in the cache, in {time.time() - started:.1f}s; cache: {_cache_summary()}")
    return 0


def _check_rows(device: str, names: list[str] | None = None) -> list[tuple[str, str, bool, str]]:
    from cupy_ops import testing

    rows = []
    for name, op in _selected_ops(names).items():
        for label, call_args in (op.examples(device) if op.examples else []):
            try:
                problem = testing.check_example(op, call_args)
            except Exception as exc:  # noqa: BLE001 - a failing op is a FAIL row, the others still run
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append((name, f"{label} on {device}", problem is None, problem or "ok"))
    return rows


def cmd_check(args: argparse.Namespace) -> int:
    gpu = _gpu_available()
    problem = _nvrtc_problem()
    if gpu and problem:
        print(f"cannot compile the kernels for this GPU: {problem}", file=sys.stderr)
        return 2
    if not gpu:
        print("no CUDA GPU found: checking the CPU references"
              + (" and compiling every kernel with NVRTC instead" if problem is None else
                 f"; NVRTC compile checks skipped: {problem}"))
    torch.manual_seed(args.seed)
    rows = _check_rows("cuda" if gpu else "cpu", args.op)
    if not gpu and problem is None:
        for arch in (80, 90):
            for kernel in kernels(args.op or None):
                try:
                    report = compiler.ptxas_report(kernel.source, kernel.name_expression, arch, root=kernel.root)
                    passed = kernel.spills_allowed(report)
                    detail = f"{report.registers} registers, {report.spill_stores} B spilled"
                    if passed and (report.spill_stores or report.spill_loads):
                        detail += f" (known, up to {kernel.spill_allowance(arch)} B: Kernel.known_spills)"
                except compiler.CompileError as exc:
                    passed, detail = False, str(exc)  # NVRTC's whole log: the error is in it
                rows.append(("nvrtc", f"sm_{arch} {kernel.name_expression}", passed, detail))
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
    warm.add_argument("--arch", type=int, default=None,
                      help=f"compute capability, e.g. 90 (default: this GPU; at least {MIN_ARCH})")
    warm.set_defaults(func=cmd_warmup)
    check = sub.add_parser("check", help="every op against its reference on random data; pass/fail table")
    check.add_argument("--seed", type=int, default=int(os.environ.get("CUPY_OPS_SEED", "0")))
    check.add_argument("--op", action="append", choices=sorted(ops()), help="only this op (repeatable; default: all)")
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="roofline table: us, GB/s, %% of copy bandwidth, ratio to torch and vLLM")
    from cupy_ops import _bench

    _bench.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
