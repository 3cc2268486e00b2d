"""Every kernel's machine code, without a GPU: compare two kernel trees or two NVRTC releases instruction by
instruction, or see how many instructions each source line became.

    python bench/sass.py dump FILE.json [--root DIR] [--arch 90]     # {name expression: [instructions]}
    python bench/sass.py diff A.json B.json                          # identical / NOP-only / different kernels
    python bench/sass.py lines "top_k_per_row.cu" "cupy_ops::top_k_per_row_two_pass_kernel<256>" [--root DIR]

`dump` compiles every op's kernels with this environment's NVRTC (from `--root`, another checkout's cuda_kernels/,
or this one's) and disassembles the cubins with nvdisasm (`$NVDISASM`, else on PATH: `pip download --no-deps
nvidia-cuda-nvdisasm` and unzip it; any release reads older cubins). Instructions keep their operands, not their
addresses, so code that moved compares equal. Run `dump` in two venvs (e.g. the cuda12 and cuda13 extras) or on two
trees, then `diff`: a refactor whose kernels stay identical needs no GPU run to keep its figures (session 29: NVRTC
12.9 and 13.0 gave the same instructions for all 131 kernels, alignment NOPs aside). `lines` counts a kernel's
instructions by source line (compiled with -lineinfo): static counts, not the profiler's dynamic ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cupy_ops._runtime import compiler
from cupy_ops.ops import kernels

_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+([^;]*)")  # an instruction ends at its ";"
_ANNOTATION = re.compile(r"\(\*.*?\*\)")  # nvdisasm's (*"SpillRefill"*) and the like, before the ";"
_LINE = re.compile(r'## File "([^"]+)", line (\d+)')


def nvdisasm() -> str:
    tool = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not tool:
        raise SystemExit("nvdisasm not found: set NVDISASM (pip download --no-deps nvidia-cuda-nvdisasm, unzip it)")
    return tool


def disassemble(image: bytes, line_info: bool = False) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(image)
        cubin.flush()
        return subprocess.run([nvdisasm(), "-c", *(["-g"] if line_info else []), cubin.name], check=True,
                              capture_output=True, text=True).stdout


def instructions(listing: str) -> list[str]:
    """The listing's instructions, addresses and trailing comments dropped, whitespace normalised."""
    found = (_INSTRUCTION.match(line) for line in listing.splitlines())
    return [" ".join(_ANNOTATION.sub("", m.group(1)).split()) for m in found if m]


def dump(path: str, root: str | None, arch: int) -> None:
    by_name = {k.name_expression: k for k in kernels()}
    result, failed = {}, []
    for name, kernel in sorted(by_name.items()):
        try:  # another tree may lack an instantiation this checkout's ops list: `diff` reports it missing
            compiled = compiler.compile_kernel(kernel.source, name, arch, root=Path(root) if root else kernel.root)
        except compiler.CompileError:
            failed.append(name)
            continue
        result[name] = instructions(disassemble(compiled.image))
    Path(path).write_text(json.dumps({"nvrtc": list(compiler.nvrtc_version()), "arch": arch, "kernels": result}))
    print(f"{len(result)} kernels, NVRTC {'.'.join(map(str, compiler.nvrtc_version()))}, sm_{arch}: {path}"
          + (f" ({len(failed)} did not compile there)" if failed else ""))


def compare(a: dict, b: dict) -> dict:
    """Kernel name -> "identical", "nop-only" (the same instructions once NOPs are dropped), "different" or
    "missing" (in one side only)."""
    verdicts = {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            verdicts[name] = "missing"
        elif a[name] == b[name]:
            verdicts[name] = "identical"
        else:
            strip = [[i for i in side[name] if i != "NOP"] for side in (a, b)]
            verdicts[name] = "nop-only" if strip[0] == strip[1] else "different"
    return verdicts


def diff(path_a: str, path_b: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    verdicts = compare(a["kernels"], b["kernels"])
    for name, verdict in verdicts.items():
        if verdict in ("different", "missing"):
            print(f"{verdict:<10} {name}")
    print(", ".join(f"{n} {v}" for v, n in sorted(collections.Counter(verdicts.values()).items())),
          f"(NVRTC {a['nvrtc']} sm_{a['arch']} against NVRTC {b['nvrtc']} sm_{b['arch']})")
    return int(any(v in ("different", "missing") for v in verdicts.values()))


def source_lines(listing: str) -> collections.Counter:
    """(file name, line) -> instructions attributed to it, from a listing with line information."""
    counts, where = collections.Counter(), ("?", 0)
    for line in listing.splitlines():
        if m := _LINE.search(line):
            where = (Path(m.group(1)).name, int(m.group(2)))
        elif _INSTRUCTION.match(line):
            counts[where] += 1
    return counts


def lines(source: str, name: str, root: str | None, arch: int) -> None:
    compiled = compiler.compile_kernel(source, name, arch, options=("-lineinfo",), root=Path(root) if root else None)
    counts = source_lines(disassemble(compiled.image, line_info=True))
    for (file, line), n in sorted(counts.items()):
        print(f"{file}:{line} {n}")
    print(f"{sum(counts.values())} instructions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump")
    p.add_argument("json")
    p.add_argument("--root")
    p.add_argument("--arch", type=int, default=90)
    p = sub.add_parser("diff")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("lines")
    p.add_argument("source")
    p.add_argument("name")
    p.add_argument("--root")
    p.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump(args.json, args.root, args.arch)
    elif args.command == "diff":
        return diff(args.a, args.b)
    else:
        lines(args.source, args.name, args.root, args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
