"""The top-k device code (common/topk*.cuh, top_k_per_row.cu, persistent_topk.cu) run on the CPU through
topk_emulation.py (g++, one OS thread per CUDA thread), every slot compared with the reference: the streaming,
shrink, radix select, cluster exchange and emission logic, the sampled cutoffs and the two-pass kernel, at the
geometries below."""

from __future__ import annotations

import ctypes
import math
from typing import NamedTuple

import pytest
import torch
from cuda_emulation import requires_gxx
from topk_emulation import WIDE_SLOTS, Geometry, build_emulator
from topk_utils import (
    DECODE,
    PERSISTENT,
    PREFILL,
    PaddedOutput,
    assert_reference,
    decode_args,
    make_scores,
    persistent_args,
    prefill_args,
    replace_arg,
)

from cupy_ops.ops import topk_rows as R

pytestmark = requires_gxx


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulation library (topk_emulation.py), built from the current sources (about 3 s)."""
    return build_emulator(tmp_path_factory.mktemp("topk_emulator"))

# A shrink needs a chunk above k + 8 x threads: widths ~9000 with small k give one to a dozen (ascending scores
# shrink at every group); clusters of 2 and 4 cover the exchange with empty, partial and full chunks, and one of 8
# the radix round that sums a bin over more than 4 CTAs. The two-pass kernel runs at the plans' 256 and 512 threads
# with a list of 2048-4096 entries (and at 1024 threads, the plans' for rows that fit the SMs, among the sampled
# cases below): rows of 8192 and more take its sampled read (the plan's target, ~280 survivors), the others (and
# sample=0) two reads, whose list holds the k-th largest's bin; and with one of 8 entries that none can fit (the
# sampled read overflows it, then the select and the marking read the row again); `ring`: the sampled read stages
# its next batch in shared memory beside a list of that many entries (as the plans do where the list
# has room; among the sampled cases: a list it overflows, whose two reads then have the ring's entries too, and 1024
# threads over ascending rows of 16500, whose top k lie past the first batch: 2048 slots at 1024 threads). Whole
# chunks of 256 threads run the kernel compiled without the streaming path (prefill and persistent `Geometry(256)`).
# Streaming buffers (shrink) of chunks >= 8192 filter by the plan's sampled cutoff; persistent rows also by one at
# the largest sample (sample=1), which lets fewer than k of randn and low-bits rows through, so the chunk is read
# again. (The emulation runs ~1-3 s per case on two cores: the matrix is kept small.)
PREFILL_GEOMETRIES = [Geometry(256), Geometry(256, shrink=True), Geometry(512, shrink=True),
                      Geometry(512, 2, shrink=True), Geometry(1024, 2), Geometry(256, list_cap=4096),
                      Geometry(512, list_cap=4096, sample=0), Geometry(256, list_cap=8),
                      Geometry(512, list_cap=2048, ring=True), Geometry(512, registers=True),
                      Geometry(256, 4, registers=True),
                      Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", PREFILL_GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", ["special", "ascending"])
def test_prefill_rows(emulator, monkeypatch, kind, geometry):
    """Unaligned starts, lengths k - 1 / k / k + 1, an inverted window, long rows; NaN past every window."""
    gen = torch.Generator().manual_seed(len(kind) + geometry.threads + geometry.cluster)
    width, k = 9001, 61
    logits = make_scores(kind, 5, width, gen)
    args = prefill_args(logits, [1, 0, 3, 10, 5], [width, k - 1, 3 + k, 10 + k + 1, 4], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill {kind} {geometry}")


DECODE_GEOMETRIES = [Geometry(512, shrink=True), Geometry(512, 4), Geometry(256, 2),  # (strided: no two-pass)
                     Geometry(512, registers=True), Geometry(256, 4, registers=True),
                     Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", DECODE_GEOMETRIES, ids=str)
def test_decode_strided_rows(emulator, monkeypatch, geometry):
    """Columns with stride 2 (element loads), next_n 2 with a sequence shorter than next_n, tied values; indices
    rows 301 apart (odd: every row's output at another alignment), padding untouched."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster)
    buffer = make_scores("ties", 4, 2 * 9001, gen)
    output = PaddedOutput(4, 300, 301, "cpu")
    args = output.into(DECODE, decode_args(buffer[:, ::2], 2, [9001, 1], 300))
    geometry.run(emulator, monkeypatch, DECODE, args)
    assert_reference(DECODE, args, what=f"decode {geometry}")
    output.assert_padding_untouched(f"decode {geometry}")


PREFILL_STRIDED_GEOMETRIES = [Geometry(256), Geometry(512, shrink=True), Geometry(512, 4),
                              Geometry(512, registers=True)]


@pytest.mark.parametrize("geometry", PREFILL_STRIDED_GEOMETRIES, ids=str)
def test_prefill_strided_rows(emulator, monkeypatch, geometry):
    """Columns with stride 2 from an odd offset (element loads from each window's start x stride1; no two-pass:
    its plans want unit strides), unaligned starts, lengths W - 1, W - 1 (shrunk many times under the shrink
    geometry) and k + 1: equal to the reference of the contiguous copy (stride0 = W, stride1 = 1), which never
    sees the strides."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 11)
    width, k = 9001, 61
    view = make_scores("randn", 3, 2 * width + 1, gen)[:, 1::2]
    args = prefill_args(view, [1, 0, 7], [width, width - 1, 7 + k + 1], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    dense = replace_arg(replace_arg(replace_arg(args, 0, view.contiguous()), 5, width), 6, 1)
    assert_reference(PREFILL, dense, what=f"prefill stride1 = 2 {geometry}")


PERSISTENT_GEOMETRIES = [Geometry(256), Geometry(512), Geometry(1024, shrink=True), Geometry(512, 2), Geometry(512, 4),
                         Geometry(256, 2, shrink=True), Geometry(256, 8), Geometry(256, list_cap=2048),
                         Geometry(256, list_cap=8), Geometry(512, list_cap=2048, ring=True),
                         Geometry(1024, list_cap=2048, ring=True), Geometry(512, shrink=True, sample=1),
                         Geometry(512, registers=True), Geometry(256, 4, registers=True),
                         Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", PERSISTENT_GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "lowbits", "neginf"])
def test_persistent_rows(emulator, monkeypatch, kind, geometry):
    """An odd row pitch (each row misaligned differently), lengths -1 / k / W + 17 / k + 1; low-bits ties and
    -inf filling the last slots; output rows k + 3 apart (a row stride other than k), padding untouched."""
    gen = torch.Generator().manual_seed(geometry.threads * geometry.cluster)
    width, k = 9001, 64
    logits = make_scores(kind, 4, width + 2, gen)[:, :width]
    output = PaddedOutput(4, k, k + 3, "cpu")
    args = output.into(PERSISTENT, persistent_args(logits, [-1, k, width + 17, k + 1], k, max_seq_len=width - 3))
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    assert_reference(PERSISTENT, args, what=f"persistent {kind} {geometry}")
    output.assert_padding_untouched(f"persistent {kind} {geometry}")


# Calls whose windows need the clamping or the L <= k path, at each kind of kernel: one CTA, a cluster of 8 (CTAs
# with empty chunks), the row in registers and the two-pass kernel (plans give it such rows only under the GPU
# tests' each_row_kernel, but nothing in it assumes wide rows).
SMALL_GEOMETRIES = [Geometry(256), Geometry(256, 8), Geometry(256, registers=True), Geometry(256, list_cap=4096)]


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES, ids=str)
def test_rows_narrower_than_k(emulator, monkeypatch, geometry):
    """Width 40, k 61: every window is shorter than k, so each row is its window's indices then the -1 tail, all
    written over UNWRITTEN. Prefill [0, 40) (the whole row), [3, 20), [0, 0); decode with [1, 3] seq_lens, one per
    row (next_n 3): 40, 17, 0; persistent with max_seq_len 25 (< k and < W) capping 40, then 12 and -1."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 13)
    width, k = 40, 61
    logits = make_scores("ties", 3, width, gen)
    calls = [(PREFILL, prefill_args(logits.clone(), [0, 3, 0], [40, 20, 0], k)),
             (DECODE, decode_args(logits.clone(), 3, [[40, 17, 0]], k)),
             (PERSISTENT, persistent_args(logits.clone(), [40, 12, -1], k, max_seq_len=25))]
    for op, args in calls:
        geometry.run(emulator, monkeypatch, op, args)
        assert_reference(op, args, what=f"{op.name} width {width} < k {k} {geometry}")


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES, ids=str)
def test_prefill_windows_outside_the_row(emulator, monkeypatch, geometry):
    """The documented clamping (start = clamp(rowStart, 0, W), end = clamp(rowEnd, start, W)), width 300, k 61:
    starts -4 (window [0, 30)), W + 5 (empty), -1 with end W (the whole row, L > k), -7 with end 200 (L > k from a
    clamped start); NaN outside each clamped window, so a read outside it would be selected."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 17)
    width, k = 300, 61
    logits = make_scores("randn", 4, width, gen)
    args = prefill_args(logits, [-4, width + 5, -1, -7], [30, width + 9, width, 200], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill clamped windows {geometry}")


# The sampled cutoff (common/topk.cuh: sample_cutoff) is exact whatever it is: a cutoff that lets fewer than k
# through makes the CTA read its chunk again (the two-pass kernel: also one that lets more than its list holds;
# then it reads the row twice). These pin where that happens. Descending rows of 8998 (runs 281 apart,
# the first at index 108: load_sample) put the rank-R sample (R <= 64) at index 107 + R, so 108 + R scores reach it,
# with R = ceil(target x 2048 / 8998): a target of 276 survivors (R 63) lets 171 through, so exactly k = 171 (the
# boundary: no re-read) and one short of k = 172 (re-read); one of 277 (R 64) lets more than 172 through (the
# select takes that rank's 11-bit bin whole: 192, simulated); randn rows with NaN and +inf late in the row need NaN
# to pass a finite cutoff's float compare; rows of 16500 give each CTA of a pair a chunk over 8192, so both sample
# (sample=1: both read again); ~280 of the late-nan-inf rows pass the plan's cutoff, more than a list of 200; rows
# with NaN at every 20th column put 103 NaN among the 2048 samples, above the plan's rank 65, so the cutoff is NaN's
# key (above +inf's: the key compare instead of the float one) and the row's 450 NaN make the list; NaN of random
# payloads and signs at every 50th column (~41 of the samples) leave a finite cutoff, and the row's 181 NaN, more than
# k, must tie whatever their bits: the 64 lowest columns win.
class SampledCase(NamedTuple):
    scores: str
    k: int
    geometry: Geometry
    reread: bool  # the chunk is read again


SAMPLED_CASES = {
    "descending-sample1-reread": SampledCase("descending", 172, Geometry(512, shrink=True, sample=1), True),
    "descending-171-pass-reread": SampledCase("descending", 172, Geometry(512, shrink=True, sample=276), True),
    "descending-k-pass": SampledCase("descending", 172, Geometry(512, shrink=True, sample=277), False),
    "descending-exactly-k": SampledCase("descending", 171, Geometry(512, shrink=True, sample=276), False),
    "late-nan-inf-1024": SampledCase("late-nan-inf", 64, Geometry(1024, shrink=True), False),
    "late-nan-inf-512": SampledCase("late-nan-inf", 64, Geometry(512, shrink=True), False),
    "pair-sample1-reread": SampledCase("randn-16500", 64, Geometry(256, 2, shrink=True, sample=1), True),
    "two-pass-sample1-reread": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=1), True),
    "two-pass-171-pass-reread": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=276), True),
    "two-pass-k-pass": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=277), False),
    "two-pass-exactly-k": SampledCase("descending", 171, Geometry(256, list_cap=2048, sample=276), False),
    "two-pass-nan-cutoff-1024": SampledCase("nan-every-20", 64, Geometry(1024, list_cap=2048), False),
    "two-pass-late-nan-inf": SampledCase("late-nan-inf", 64, Geometry(512, list_cap=2048), False),
    "two-pass-list-overflow-reread": SampledCase("late-nan-inf", 64, Geometry(256, list_cap=200), True),
    "two-pass-nan-payloads": SampledCase("nan-payloads", 64, Geometry(256, list_cap=2048), False),
    "two-pass-ring-exactly-k": SampledCase("descending", 171, Geometry(512, list_cap=2048, sample=276, ring=True),
                                           False),
    "two-pass-ring-nan-cutoff-1024": SampledCase("nan-every-20", 64, Geometry(1024, list_cap=2048, ring=True), False),
    "two-pass-ring-overflow-reread": SampledCase("late-nan-inf", 64, Geometry(512, list_cap=200, ring=True), True),
    "two-pass-ring-1024-two-batches": SampledCase("ascending-16500", 64, Geometry(1024, list_cap=2048, ring=True),
                                                  False),
}


@pytest.mark.parametrize("case", SAMPLED_CASES)
def test_sampled_cutoff(emulator, monkeypatch, case):
    """Results equal the reference whether or not the sampled cutoff let k through; the chunk is read again
    exactly when it did not (the two-pass kernel: or when more than its list holds did; the plan's own target never
    re-reads randn rows)."""
    kind, k, geometry, reread = SAMPLED_CASES[case]
    gen = torch.Generator().manual_seed(7)
    width = 16500 if kind.endswith("-16500") else 9001
    logits = make_scores("randn" if "nan" in kind else kind.split("-")[0], 4, width + 2, gen)
    if kind == "nan-every-20":
        logits[:, ::20] = float("nan")
    if kind == "nan-payloads":
        payloads = torch.randint(1, 1 << 23, (4, width // 50 + 1), generator=gen, dtype=torch.int32) | 0x7F800000
        signs = torch.randint(0, 2, payloads.shape, generator=gen, dtype=torch.int32) * torch.iinfo(torch.int32).min
        logits[:, :width:50] = (payloads | signs).view(torch.float32)
    if kind == "late-nan-inf":
        logits[:, [5001, 7003, 8501]] = float("nan")
        logits[:, [6001, 8003]] = float("inf")
    args = persistent_args(logits[:, :width], [-1, k, width + 17, k + 1], k, max_seq_len=width - 3)
    emulator.take_rereads()
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    rereads = emulator.take_rereads()
    assert_reference(PERSISTENT, args, what=f"sampled cutoff {case}")
    assert (rereads > 0) == reread, f"{case}: {rereads} thread re-reads; expected {'some' if reread else 'none'}"


@pytest.mark.parametrize("case", [name for name, case in SAMPLED_CASES.items() if case.geometry.ring])
def test_ring_copies_landing_when_issued(emulator, monkeypatch, case):
    """The ring cases with every cp.async landing as it is issued (hardware may land a copy any time before its
    wait): the next batch staged over ring slots the current batch still reads would overwrite them here."""
    emulator.set_copies_land_at_issue(1)
    try:
        test_sampled_cutoff(emulator, monkeypatch, case)
    finally:
        emulator.set_copies_land_at_issue(0)


@pytest.mark.parametrize("geometry", [Geometry(256, list_cap=2048), Geometry(512, list_cap=2048, ring=True),
                                      Geometry(1024, list_cap=2048, ring=True)], ids=str)
def test_two_pass_odd_bitmap_words(emulator, monkeypatch, geometry):
    """Rows 8200 wide: ceil(8200 / 32) = 257 bitmap words, rounded up to 258 (two_pass_words) so that the list's
    keys, which the select reads four at a time (under 1024 threads: also beside a ring), and the staged outputs,
    copied 16 bytes at a time (k = 64), are 16-byte aligned; starts 1 and 0 (the sampled read) and a row under 4 x
    the sample (the two reads)."""
    gen = torch.Generator().manual_seed(geometry.threads + 5)
    width, k = 8200, 64
    logits = make_scores("randn", 3, width, gen)
    args = prefill_args(logits, [1, 0, 8], [width, width, 3000], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"odd bitmap words {geometry}")


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("width", [131072, 131104])
def test_two_pass_emission_words_a_thread(emulator, monkeypatch, width, kind):
    """The emission of 1024-thread CTAs, which take a thread's bitmap words four at a time: rows where a thread owns 4
    words (131072: 4096 words, each thread's four read as one 16-byte vector) or 5 (131104: 4097 words, of 4098
    (two_pass_words), so eq is only 8-byte aligned: vectors where a run of four is aligned, single words elsewhere,
    the last thread's run cut at the row's end); ties: 10 distinct values, the k taken among ~13000 equal to the
    largest, in the first threads' eq words. Windows from columns 0 and 3 (unaligned), and one of k + 1."""
    gen = torch.Generator().manual_seed(width + len(kind))
    k = 64
    logits = make_scores(kind, 3, width, gen)
    args = prefill_args(logits, [0, 3, 7], [width, width, 7 + k + 1], k)
    Geometry(1024, list_cap=16384, ring=True).run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"emission words {kind} {width}")


@pytest.mark.parametrize("geometry", [Geometry(256, list_cap=2048), Geometry(512, list_cap=2048, ring=True),
                                      Geometry(1024, list_cap=2048, ring=True)], ids=str)
def test_two_pass_list_select_to_the_last_bit(emulator, monkeypatch, geometry):
    """The select on the sampled read's list down to key bits 1-0: randn rows of 9001 with 96 scattered scores 8.0
    + j ulps (j = 0..7, 12 each) above them all; k = 64 puts the k-th largest at the 4th of j = 2 in column order, so
    every round but the last leaves a bin of several j values (the list also holds the ~200 randn scores above the
    sampled cutoff, near 2.0). Prefill windows from columns 0 and 3 (unaligned), persistent lengths W and W - 5."""
    gen = torch.Generator().manual_seed(geometry.threads + 29)
    width, k = 9001, 64
    logits = make_scores("randn", 2, width, gen)
    for r in range(2):
        columns = torch.randperm(width - 8, generator=gen)[:96] + 8
        levels = torch.arange(96) % 8 + torch.tensor(8.0).view(torch.int32).item()
        logits[r, columns] = levels.to(torch.int32).view(torch.float32)
    args = prefill_args(logits.clone(), [0, 3], [width, width], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill last bits {geometry}")
    args = persistent_args(logits.clone(), [width, width - 5], k)
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    assert_reference(PERSISTENT, args, what=f"persistent last bits {geometry}")


def test_the_filter_compare_equals_the_key_compare(emulator):
    """The filters (topk_row's, the two-pass kernel's sampled read) test key(x) >= min_key as !(x <
    key_floor(min_key)) for 0 < min_key <= key(+inf): equal for every value class (+-0, denormals, +-inf, NaN of
    either sign) against min_keys at, next to and between their keys, and at the ends of the range."""
    emulator.float_key.restype, emulator.float_key.argtypes = ctypes.c_uint32, [ctypes.c_float]
    emulator.key_floor.restype, emulator.key_floor.argtypes = ctypes.c_float, [ctypes.c_uint32]
    bits = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x3F800000,
            0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001]
    bits += torch.randint(0, 2**32, (48,), generator=torch.Generator().manual_seed(5), dtype=torch.int64).tolist()
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).tolist()
    keys = [emulator.float_key(x) for x in values]
    min_keys = {1, 0x007FFFFF, 0x00800000, 0x7FFFFFFF, 0x80000000, 0x80000001, R.NAN_KEY - 1}
    min_keys |= {m for key in keys for m in (key - 1, key, key + 1) if 0 < m <= R.NAN_KEY - 1}
    wrong = [(hex(m), x) for m in sorted(min_keys) for x, key in zip(values, keys)
             if (not x < emulator.key_floor(m)) != (key >= m)]
    assert not wrong, f"{len(wrong)} (min_key, value) pairs differ, e.g. {wrong[:4]}"


@pytest.mark.parametrize("k", [1, 512, 2048, 4096])
def test_row_targets_follow_the_plans_rule(emulator, k):
    """Each row of a two-pass call aims its sampled read at two_pass_sample_target's deviations rule for its own
    length (row_sample_target; the host sizes the list by the width's): the same target within one (float against
    double rounding), at least the floor it is given, at most the plan's, and with spread 0 the plan's for every
    row. Lengths from 2048 to 2^20, k 1 to 4096."""
    emulator.row_sample_target.restype = ctypes.c_int
    emulator.row_sample_target.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    spread = R.TWO_PASS_SAMPLE_SIGMAS / math.sqrt(R.SAMPLES)
    for length in [2048, 3000, 8191, 9212, 10215, 16384, 32768, 65537, 131072, 1 << 20]:
        host = R.two_pass_deviations_target(length, k)
        got = emulator.row_sample_target(1 << 26, length, k, spread, 1)
        assert abs(got - host) <= 1, (length, k, got, host)
        assert emulator.row_sample_target(1 << 26, length, k, spread, host + 9) == host + 9  # the floor
        assert emulator.row_sample_target(host - 7, length, k, spread, 1) == host - 7  # the plan's bound
        assert emulator.row_sample_target(host - 7, length, k, 0.0, 1) == host - 7
    if k == 2048:  # the 8192 x 32768 prefill's width
        assert emulator.row_sample_target(1 << 26, 32768, k, spread, 1024) in (2553, 2554, 2555)

