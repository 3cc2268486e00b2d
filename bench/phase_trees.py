"""Kernel trees cut after a phase, for a phase breakdown of the top-k kernels with bench/tune.py (on a GPU).

    python bench/phase_trees.py /tmp/cuts                  # writes /tmp/cuts/<cut>/ and prints the --tree arguments
    python bench/tune.py --op persistent_topk --variant base $(python bench/phase_trees.py /tmp/cuts --only tp_) \\
        --case 128x131072 --rounds 2 --json cuts.json

Each cut is a copy of cuda_kernels/ in which one kernel returns right after a phase, its thread 0 writing one value
the phase produced to the output row (so the compiler keeps the phase; a cluster syncs first, as its CTAs read each
other's shared memory). Timed beside the whole kernel in one run, the cuts give cumulative µs a phase; their outputs
are wrong by design (tune.py marks them MISMATCH). In phase order:

- two-pass kernel (common/topk_two_pass.cuh; rows of the prefill too short to sample run whole in every cut):
  tp_sample (the sampled cutoff), tp_stream (the sampled read with nothing listed), tp_list (the read and its
  appends), tp_select (the select on the list), tp_mark (its marking of the bitmaps), tp_scans (the emission's two
  block scans; the rest is staging and the output write);
- register kernel (common/topk_registers.cuh): rg_empty (launch and exit), rg_hist (the read and the 11-bit
  histogram), rg_round0 (select round 0), rg_select (the refine rounds), rg_scan (the emission's block scan).

tests/test_tune_tool.py checks that every cut still applies to the sources (each anchor found exactly once).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

KERNELS = Path(__file__).resolve().parents[1] / "cuda_kernels"
TWO_PASS = "common/topk_two_pass.cuh"
REGISTERS = "common/topk_registers.cuh"


class Edit(NamedTuple):
    file: str  # under cuda_kernels/
    old: str  # found exactly once
    new: str


def after(file: str, anchor: str, text: str) -> Edit:
    return Edit(file, anchor, anchor + text)


def before(file: str, anchor: str, text: str) -> Edit:
    return Edit(file, anchor, text + anchor)


def _exit(value: str, out: str = "out_row()[0]", cluster: bool = False) -> str:
    sync = " if constexpr (CLUSTER > 1) cluster_sync();" if cluster else ""
    return f"  if (len > 0) {{ if (threadIdx.x == 0) {out} = static_cast<int>({value});{sync} return; }}\n"


_LISTED = "    list_above<THREADS>(base, len, cutoff, list_keys, list_columns, cap, sh);\n    __syncthreads();\n"
_HISTOGRAM = ("        if (v >> e & 1u) atomicAdd(&sh.fine[key[4 * u + e] >> 21], 1u);\n      }\n    }\n  }\n"
              "  __syncthreads();\n")
_ROUND0 = "  select_round0<THREADS, CLUSTER>(static_cast<uint32_t>(k), true, sh);\n"

CUTS: dict[str, list[Edit]] = {
    "tp_sample": [after(TWO_PASS, "    const uint32_t cutoff = sample_cutoff<THREADS>(sample_values, 0, len, sample, sh);\n",
                        _exit("cutoff"))],
    "tp_stream": [after(TWO_PASS, _LISTED, _exit("sh.appended")),
                  Edit(TWO_PASS, "    pass &= valid;\n", "    pass &= cutoff == 0x7fffffffu ? valid : 0u;\n")],
    "tp_list": [after(TWO_PASS, _LISTED, _exit("sh.appended"))],
    "tp_select": [after(TWO_PASS, "\n      }, false, sh, pivot, mask, rem);\n", _exit("pivot"))],
    "tp_mark": [before(TWO_PASS, "  if (!listed) {\n    for_each_element", _exit("take").replace("len > 0", "listed && len > 0"))],
    "tp_scans": [after(TWO_PASS, "  int slot = static_cast<int>(block_exclusive_sum<THREADS>(count, total, sh, parity));\n",
                       _exit("slot"))],
    "rg_empty": [before(REGISTERS, "  const bool contiguous = stride == 1;\n", _exit("len", "out[0]"))],
    "rg_hist": [after(REGISTERS, _HISTOGRAM, _exit("sh.fine[5]", "out[0]"))],
    "rg_round0": [after(REGISTERS, _ROUND0, _exit("sh.found[0]", "out[0]", cluster=True))],
    "rg_select": [after(REGISTERS, "  }, true, sh, pivot, mask, rem);\n", _exit("pivot", "out[0]", cluster=True))],
    "rg_scan": [after(REGISTERS, "  const uint32_t before = block_exclusive_sum<THREADS>(above | equal << 16, total, sh, parity);\n",
                      _exit("before + total", "out[0]", cluster=True))],
}


def cut_sources(label: str, source: Path = KERNELS) -> dict[str, str]:
    """The edited files of cut `label`: path under cuda_kernels/ -> text. Raises if an anchor is not found once."""
    texts: dict[str, str] = {}
    for edit in CUTS[label]:
        text = texts.get(edit.file) or (source / edit.file).read_text()
        if text.count(edit.old) != 1:
            raise ValueError(f"cut {label}: {edit.old!r} occurs {text.count(edit.old)} times in {edit.file}")
        texts[edit.file] = text.replace(edit.old, edit.new)
    return texts


def write_tree(label: str, folder: Path, source: Path = KERNELS) -> Path:
    tree = folder / label
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(source, tree)
    for file, text in cut_sources(label, source).items():
        (tree / file).write_text(text)
    return tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the trees go, one folder a cut")
    parser.add_argument("--only", default="", help="cuts whose name starts with this (tp_ or rg_)")
    args = parser.parse_args(argv)
    labels = [label for label in CUTS if label.startswith(args.only)]
    print(" ".join(f"--tree {label}={write_tree(label, args.folder)}" for label in labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
