"""Time one op's benchmark cases under variants of its plan's module constants, or run them once for a profiler.

    python bench/tune.py --op top_k_per_row_prefill \
        --variant base \
        --variant "min-chunk-2k: cupy_ops.ops.topk_rows.MIN_CHUNK=2048" \
        [--tree "main=/path/to/main/cuda_kernels"] [--rounds 2] [--case 4096x] [--reps 30] [--json FILE]
    ncu --profile-from-start off ... python bench/tune.py --op persistent_topk --case 128x --profile

A variant is `label: module.NAME=python-expression; ...` (`base`: no change; expressions see the module's names),
with `tree=DIR` as one of its items where its kernels compile from DIR, and `edit=FILE|OLD|NEW` items where they
compile from a copy of that tree (or of this checkout's) in which FILE (a path under cuda_kernels/) has its one
occurrence of the text OLD replaced by NEW: a kernel's constant A/B'd without carrying a tree, e.g.
`stages1: edit=common/topk.cuh|constexpr int kX = 2|constexpr int kX = 1`; a `cut=NAME` item makes the edits of
bench/phase_trees.py's cut NAME (a top-k kernel that returns after a phase), and `--cuts PREFIX` adds the variant
`NAME: cut=NAME` for each cut whose name starts with PREFIX (a phase breakdown in one run). Its constants are set,
every op's cached layouts are forgotten (plans read the constants), the cases are timed like
`python -m cupy_ops bench` times them (CUDA-graph replays, outputs checked against the float64 reference), and the
constants are restored. `--tree label=DIR` is the variant `label: tree=DIR`: DIR is another checkout's cuda_kernels/
(`git worktree add /tmp/main main`, or `git archive main cuda_kernels | tar -x -C DIR`): kernel sources A/B in one
run, on one GPU's clocks. `--rounds N` times the variants N times, interleaved, so drift shows as a difference
between rounds rather than between variants.
`--profile` runs each selected case once, warm, between cudaProfilerStart and cudaProfilerStop. A developer's tool
for choosing constants on a GPU: the results files come from `python -m cupy_ops bench`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from cupy_ops import _bench
from cupy_ops._bench import harness
from cupy_ops._runtime import Kernel, compiler
from cupy_ops.ops import kernels, ops


class Variant(NamedTuple):
    label: str
    changes: dict[tuple[str, str], object]  # (module, name) -> value
    root: str | None = None  # the kernel tree every op's kernels compile from (None: this checkout's)


def parse_variant(text: str) -> Variant:
    label, _, body = text.partition(":")
    changes, root, edits = {}, None, []
    for item in filter(None, (part.strip() for part in body.split(";"))):
        target, _, expression = item.partition("=")
        if target.strip() == "tree":
            root = kernel_tree(expression.strip(), text)
            continue
        if target.strip() == "edit":
            parts = expression.strip().split("|")
            if len(parts) != 3 or not parts[1]:
                raise SystemExit(f"{text!r}: expected edit=FILE|OLD|NEW, got {expression.strip()!r}")
            edits.append(tuple(parts))
            continue
        if target.strip() == "cut":
            cuts, name = phase_cuts(), expression.strip()
            if name not in cuts:
                raise SystemExit(f"{text!r}: no cut {name!r} (bench/phase_trees.py has {', '.join(cuts)})")
            edits += cuts[name]
            continue
        module, _, name = target.strip().rpartition(".")
        # evaluated in the module's namespace, so a value can build on its names (KERNELS, Kernel, ...)
        namespace = dict(vars(importlib.import_module(module)))
        changes[module, name] = eval(expression, namespace)  # noqa: S307 - a developer's own command line
    if edits:
        root = edited_tree(root or str(compiler.kernel_dir()), edits, text)
    return Variant(label.strip(), changes, root)


def edited_tree(folder: str, edits: list[tuple[str, str, str]], text: str) -> str:
    """A temporary copy of the cuda_kernels/ `folder` (removed at exit) with each (FILE, OLD, NEW) edit made in
    turn: FILE's one occurrence of OLD replaced by NEW (an OLD found zero or several times is refused: the edit
    would be silent or ambiguous)."""
    copy = Path(tempfile.mkdtemp(prefix="tune-tree-")) / "cuda_kernels"
    atexit.register(shutil.rmtree, copy.parent, True)
    shutil.copytree(folder, copy)
    for file, old, new in edits:
        path = copy / file
        if not path.is_file():
            raise SystemExit(f"{text!r}: {file!r} is not a file of {folder}")
        source = path.read_text()
        if source.count(old) != 1:
            raise SystemExit(f"{text!r}: {old!r} occurs {source.count(old)} times in {file}, not once")
        path.write_text(source.replace(old, new))
    return str(copy)


@functools.cache
def phase_cuts() -> dict:
    """bench/phase_trees.py's CUTS (loaded by path: this script also runs as a module outside bench/)."""
    spec = importlib.util.spec_from_file_location("phase_trees", Path(__file__).with_name("phase_trees.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CUTS


def kernel_tree(folder: str, text: str) -> str:
    if not (Path(folder) / "common").is_dir():
        raise SystemExit(f"{text!r}: {folder!r} is not a cuda_kernels/ folder")
    return str(Path(folder).resolve())


def parse_tree(text: str) -> Variant:
    """`label=DIR`: the variant `label: tree=DIR`."""
    label, _, folder = text.partition("=")
    if not label.strip():
        raise SystemExit(f"--tree {text!r}: expected label=DIR")
    return parse_variant(f"{label}: tree={folder}")


def kernels_in(value):
    """The Kernels in `value`: a Kernel, or dicts, lists and tuples (RowKernels) holding them."""
    if isinstance(value, Kernel):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from kernels_in(item)


def apply(variant: Variant) -> dict:
    """Set the variant's constants; return the old values."""
    old = {}
    for (module, name), value in variant.changes.items():
        target = importlib.import_module(module)
        old[module, name] = getattr(target, name)
        setattr(target, name, value)
    # Kernels a variant brings (a new instantiation, a kernel tree elsewhere through Kernel(root=...)) are listed
    # by every op for the run: plans may launch them.
    added = tuple(kernels_in(variant.changes))
    for op in ops().values():
        op.forget_layouts()
        old[op] = op.kernels
        op.kernels = tuple(dict.fromkeys(op.kernels + added))
    if variant.root is not None:
        for kernel in kernels():
            old[kernel] = kernel.root
            kernel.reroot(variant.root)
    return old


def restore(old: dict) -> None:
    for target, value in old.items():
        if isinstance(target, tuple):
            setattr(importlib.import_module(target[0]), target[1], value)
        elif isinstance(target, Kernel):
            target.reroot(value)
        else:
            target.kernels = value
    for op in ops().values():
        op.forget_layouts()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", required=True, choices=sorted(_bench.SUITES))
    parser.add_argument("--case", action="append", help="substring of the case names to run (repeatable)")
    parser.add_argument("--variant", action="append", default=[], help="label: module.NAME=value; ...")
    parser.add_argument("--tree", action="append", default=[], help="label=DIR: kernels from another cuda_kernels/")
    parser.add_argument("--cuts", help="one variant for each phase cut whose name starts with this (tp_, rg_)")
    parser.add_argument("--rounds", type=int, default=1, help="time the variants this many times, interleaved")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="one warm call per case inside profiler start/stop")
    parser.add_argument("--json", help="write the rows (variant, case, µs) to this file")
    args = parser.parse_args(argv)
    suite = _bench.SUITES[args.op]
    cases = [c for c in suite.cases(False) if not args.case or any(s in f"{c.name} {c.dtype_name}" for s in args.case)]
    variants = [parse_variant(v) for v in args.variant] + [parse_tree(t) for t in args.tree]
    if args.cuts:
        variants += [parse_variant(f"{name}: cut={name}") for name in phase_cuts() if name.startswith(args.cuts)]
    rows = []
    for round_, variant in ((r, v) for r in range(args.rounds) for v in variants or [Variant("base", {})]):
        old = apply(variant)
        try:
            for case in cases:
                if args.profile:
                    inputs = suite.make_inputs(case, 0)
                    call = suite.providers(case, None)["cupy_ops"]
                    call(*inputs)
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                    call(*inputs)
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
                    continue
                (row,) = harness.bench_case(args.op, suite, case, None, {"cupy_ops"}, harness.l2_cache_bytes(),
                                            args.reps, lambda m: print(m, file=sys.stderr))
                row["variant"], row["round"] = variant.label, round_
                rows.append(row)
                us = row.get("us_median")
                print(f"{variant.label:24} {round_:2} {row['case']:40} "
                      f"{'error: ' + row['error'] if us is None else f'{us:9.1f} us'}"
                      f"{'' if row.get('matches_ref', True) else '  MISMATCH'}", flush=True)
        finally:
            restore(old)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r or r.get("matches_ref") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
