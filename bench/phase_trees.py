"""The top-k kernels cut after a phase, for a phase breakdown with bench/tune.py (on a GPU):

    python bench/tune.py --op persistent_topk --variant base --cuts tp_ --case 128x131072 --rounds 2 --json cuts.json

Each cut is a list of edits (tune.py makes them in a copy of cuda_kernels/: a `cut=NAME` variant item) after which
one kernel returns right after a phase, its thread 0 writing one value the phase produced to the output row (so
the compiler keeps the phase; a cluster syncs first, as its CTAs read each other's shared memory). Timed beside the
whole kernel in one run, the cuts give cumulative µs a phase; their outputs are wrong by design (tune.py marks them
MISMATCH). In phase order:

- two-pass kernel (common/topk_two_pass.cuh; rows of the prefill too short to sample run whole in every cut):
  tp_sample (the sampled cutoff), tp_stream (the sampled read with nothing listed: valid only where the read is
  staged by cp.async, as NVRTC 13.0 moves plain loads whose elements cannot pass into the branch never taken: H100,
  session 35, 0.4 us past tp_sample for 60 MB), tp_list (the read and its appends), tp_select (the select on the
  list), tp_mark (its marking of the bitmaps), tp_scans (the emission's block scan), tp_staged (its walk over
  the bits, staging the columns in shared memory; the rest is the output write);
- register kernel (common/topk_registers.cuh): rg_empty (launch and exit), rg_read (the read), rg_hist (and the
  11-bit histogram), rg_round0 (select round 0), rg_select (the refine rounds), rg_scan (the emission's block scan).

tests/test_tune_tool.py checks that every cut still applies to the sources and compiles.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _exit(value: str, out: str = "out_row()[0]", cluster: bool = False, when: str = "len > 0") -> str:
    sync = " if constexpr (CLUSTER > 1) cluster_sync();" if cluster else ""
    return f"  if ({when}) {{ if (threadIdx.x == 0) {out} = static_cast<int>({value});{sync} return; }}\n"


_LISTED = ("    list_above<THREADS>(base, len, cutoff, list_keys, list_columns, sample_cap, sh, ring);\n"
           "    __syncthreads();")
_HISTOGRAM = ("        if (v >> e & 1u) atomicAdd(&sh.fine[key[4 * u + e] >> 21], 1u);\n      }\n    }\n  }\n"
              "  __syncthreads();\n")
_ROUND0 = "  select_round0<THREADS, CLUSTER>(static_cast<uint32_t>(k), true, sh);\n"
_CUTOFF = "    const uint32_t cutoff = sample_cutoff<THREADS>(sample_values, 0, len, sample, sh);\n"
_SLOT = "  uint32_t slot = above_before + min(equal_before, take);\n"
_STAGED = "  int* out = out_row();\n  if ((k & 3) == 0"  # (after the barrier that ends the staging)
_READ_SUM = ("  float read_sum = 0.0f;\n#pragma unroll\n"
             "  for (int j = 0; j < 4 * SLOTS; ++j) read_sum += valid >> j & 1u ? x[j] : 0.0f;\n")
_BEFORE = "  const uint32_t before = block_exclusive_sum<THREADS>(above | equal << 16, total, sh, parity);\n"

CUTS: dict[str, list[Edit]] = {
    "tp_sample": [after(TWO_PASS, _CUTOFF, _exit("cutoff"))],
    "tp_stream": [after(TWO_PASS, _LISTED, _exit("sh.appended")),
                  Edit(TWO_PASS, "    pass &= valid;\n", "    pass &= cutoff == 0x7fffffffu ? valid : 0u;\n")],
    "tp_list": [after(TWO_PASS, _LISTED, _exit("sh.appended"))],
    "tp_select": [before(TWO_PASS, "      for (int j = threadIdx.x; j < static_cast<int>(n); j += THREADS) "
                                   "mark(list_keys[j], list_columns[j]);\n      take = rem;", _exit("pivot"))],
    "tp_mark": [before(TWO_PASS, "  if (!listed) {\n    for_each_element", _exit("take", when="listed && len > 0"))],
    "tp_scans": [after(TWO_PASS, _SLOT, _exit("slot"))],
    "tp_staged": [before(TWO_PASS, _STAGED, _exit("staged[0]"))],
    "rg_empty": [before(REGISTERS, "  const bool contiguous = stride == 1;\n", _exit("len", "out[0]"))],
    "rg_read": [before(REGISTERS, "  clear_fine<THREADS>(sh);\n", _READ_SUM + _exit("read_sum", "out[0]"))],
    "rg_hist": [after(REGISTERS, _HISTOGRAM, _exit("sh.fine[5]", "out[0]"))],
    "rg_round0": [after(REGISTERS, _ROUND0, _exit("sh.found[0]", "out[0]", cluster=True))],
    "rg_select": [after(REGISTERS, "  }, true, sh, pivot, mask, rem);\n", _exit("pivot", "out[0]", cluster=True))],
    "rg_scan": [after(REGISTERS, _BEFORE, _exit("before + total", "out[0]", cluster=True))],
}

