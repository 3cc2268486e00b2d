"""The row machinery of the three top-k ops (top_k_per_row_prefill, top_k_per_row_decode, persistent_topk):
the plan constants, each next to what it was measured at; how a call's rows are cut over CTAs and which row
kernel takes them (`plan_rows`); the kernels a .cu file instantiates (`row_kernels`); the argument checks the
ops share; and the reference select (`select_rows_ref`, `float_keys`), also the CPU kernel.

The GPU algorithm (common/topk_row.cuh) reads every score once, at any length: a CTA buffers keys in shared memory
and, when the buffer is full, keeps its own top k and filters the rest of the row above it (a long chunk is filtered
from its start by a cutoff sampled from it, and read again only if that cutoff let fewer than k through). On sm_90,
when few rows leave SMs idle, each row is split over a thread-block cluster of up to 16 CTAs that select through
distributed shared memory. Calls of many wide contiguous rows take the two-pass kernel (common/topk_two_pass.cuh:
one read that lists the elements above a sampled cutoff, or a histogram read, then a read that marks bitmaps);
calls whose grid fits the SMs, with chunks of up to 5-6 slots a thread, the row-in-registers kernel
(common/topk_registers.cuh: one read into registers, one block scan orders the output). All three ops share
the device code and everything here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._runtime import Call, Kernel, LaunchConfig, launcher

MAX_K = 4096              # the staging buffer (k entries) and one group must fit next to the buffer
MAX_WIDTH = 2**31 - 8     # int32 indices; the kernel's slot arithmetic needs len + 6 < 2^31
MAX_ROWS = 2**31 - 1      # rows (and next_n, an int32 field): CUDA's grid.x limit
# (threads, cluster) instantiations, 64 registers each on sm_90: 256-thread CTAs (4 per SM) for chunks of up to
# SMALL_CHUNK elements, alone or in clusters; 512-thread CTAs (2 per SM) for many longer rows; 1024-thread CTAs
# (1 per SM) for few long rows, alone or in clusters.
INSTANTIATIONS = tuple((t, c) for t in (256, 512, 1024) for c in (1, 2, 4, 8, 16) if t != 512 or c == 1)
TWO_PASS_THREADS = (256, 512, 1024)  # the two-pass kernel's instantiations (one CTA a row)
# topk_row compiled for whole chunks only (WHOLE: no streaming path, 40 registers) where CTA_SHAPES plans five CTAs
# of 256 threads an SM, which the general kernel's 64 registers do not allow (common/topk.cuh: kWholeCtas256).
WHOLE_INSTANTIATIONS = ((256, 1),)
# The row-in-registers kernel (common/topk_registers.cuh) takes the whole chunks of calls whose grid fits the SMs,
# up to REGISTER_SLOTS[threads] x threads 16-byte slots a CTA (one CTA an SM: 1024 threads hold 5 slots in 56 of
# their 64 registers, 256 and 512 threads 6 in 56-64; NVRTC 13.0, sm_90, no spills on sm_80 or sm_90; 61 and 71-80
# before session 34 unrolled the select's rounds, whose A/B is in docs/performance-log.md). H200, against the buffer
# kernel (bench/tune.py, one run, us; 256 and 512 threads at 64 registers): decode 1 x 8192 6.5 vs
# 7.5, 1 x 163840 12.5 vs 13.9, persistent 4 x 163840 12.8 vs 14.2, 4 x 65536 11.3 vs 11.8, 64 x 20000 11.5 vs
# 12.5, 8 x 262144 27.2 vs 29.2; but calls of more CTAs than SMs, which it took in 512-thread CTAs (two an SM;
# 256-thread ones held too few scores), were slower: prefill 4096 x 8192 106.5 vs 93.0, persistent 1024 x 8192
# 35.2 vs 33.5. REGISTER_ROWS = False: never (the buffer kernel instead).
REGISTER_SLOTS = {256: 6, 512: 6, 1024: 5}
REGISTER_ROWS = True
# A CTA's per-row cost is ~1000 instructions a thread whatever its chunk (radix rounds, barriers, emission), so
# a thread should have tens of elements: many rows with chunks up to SMALL_CHUNK take 256 threads (the 4096-row
# prefill at 512 threads per CTA spent ~100 of its ~145 instructions per element on that fixed part, measured
# with ncu; 256 threads: 128 -> 104 us). Few rows are latency-bound and need the loads in flight of 1024 threads,
# except rows cut in 4+ CTAs of at most SMALL_CLUSTER_CHUNK (H200, 256 vs 1024 threads: 16 x 32768 11.8 vs 19.8
# us, 4 x 65536 12.0 vs 12.5; but 4 x 163840 at 10240 a CTA 17.5 vs 15.4, 64 x 20000 in pairs 15.7 vs 13.0,
# 8 x 4096 alone 7.4 vs 6.6).
SMALL_CHUNK, SMALL_CLUSTER_CHUNK = 16384, 8192
MAX_CLUSTER = 16          # H100/H200 allow 16 CTAs per cluster with the non-portable attribute (the launcher sets it)
MIN_CHUNK = 4096          # elements per CTA below which more CTAs per row cost more (barriers) than they save
# Rows narrower than this stay whole in one CTA (H200, with the 8-bit select: 1 x 8192 decode in one 1024-thread CTA
# 7.9 us, in a pair 9.2, in four 7.7, but the four-way rule, MIN_CHUNK 2048, also split 8 x 4096: 8.1 against 6.3;
# widths between 8192 and 16384 not measured; 2026-12-02, 1 x 8192 decode: whole 7.5 us, in a pair 7.5, in four
# 256-thread CTAs (MIN_CHUNK 1024) 7.3: too little to split; persistent 64 x 20000 k 512 in one 1024-thread CTA a
# row (MIN_SPLIT_WIDTH 32768) 12.4 us, as in pairs).
MIN_SPLIT_WIDTH = 16384
# But a row that one 1024-thread register CTA holds (up to 20477 scores: REGISTER_SLOTS[1024] x 1024 slots, less
# the alignment slack) stays whole where the grid fits the SMs: a pair's cluster barriers cost more than half the
# row's loads save. A/B in one run each (the same plan as MIN_SPLIT_WIDTH 32768 there), persistent 64 x 20000 k 512
# against pairs: H200 9.4 -> 9.2 us (session 26), 9.7 -> 9.4 (session 28); H100 10.7 -> 9.7 (session 29; vLLM's
# kernel 8.98 there); no other case of the suites changes. Other few-row calls of rows 16384-20477 wide are
# unmeasured. (Wider rows keep pairs of register CTAs: one CTA would have to buffer them in shared memory.)
WHOLE_REGISTER_ROWS = True
# Clusters grow while the doubled grid fits the SMs (one CTA an SM). Two CTAs an SM (H200, 2026-12-02, with
# 512-thread cluster instantiations added: bench/tune.py) made 32 x 163840 k 2048 whole chunks in 8 x 512 threads:
# 42.3 -> 37.8 us; but 128 x 131072 streaming in 2 x 512: 34.2 -> 44.6, decode 64 x 65536 k 512 in 4 x 256: 20.1 ->
# 28.5, 64 x 20000: 12.4 -> 12.7.
# Copy-ring stages a CTA of this many threads gets when its chunk and shared memory allow (stages - 1 groups of 32
# bytes a thread in flight). More do not help: H200, persistent 128 x 131072 k 2048 (a 1024-thread CTA streams
# 512 KB) took 35.3 / 35.5 / 35.5 us with 2 / 3 / 4 stages (4: with a shrink's staging moved into the ring to make
# room), so the stream is bound by the work per group, not by the loads in flight.
RING_STAGES = {256: 2, 512: 2, 1024: 3}
# A CTA alone on its SM buffers a whole chunk only where room for MIN_WHOLE_STAGES ring stages (or all its groups)
# would be left beside it (measured when whole chunks still loaded through the ring: with one stage nothing else on
# the SM loads while it appends, and the plan streams instead; H200, 2026-12-03: persistent 32 x 163840 k 2048,
# whole 40960-element chunks in 4 x 1024 threads at 1 stage 40.9 us, against 30.2 streamed by pairs). Whole chunks
# have no ring since session 36: the rule is kept as a bound on the chunk. CTAs that share an SM have no such bound.
MIN_WHOLE_STAGES = 2
MAX_CAP = 65532           # buffer entries: the kernel packs counts of entries in 16 bits
# The two-pass kernel (common/topk_two_pass.cuh) takes calls of more than TWO_PASS_ROWS_PER_SM rows per SM whose
# rows are at least TWO_PASS_WIDTH_PER_K x k wide. H200, its two reads against topk_row (bench/tune.py, one run):
# 8192 x 32768 prefill k 2048 547 vs 616 us, 2048 x 16384 prefill k 512 76.1 vs 82.0, 256 x 32768 persistent k 512
# 27.6 vs 28.6 (widths 16-64 k); slower with more selected or fewer rows: 256 x 16384 decode k 2048 (8 k) 26.4 vs
# 19.2, 4096 x 8192 prefill k 2048 113 vs 94, 64 x 65536 k 512 25.9 vs 21.1; even at 128 x 131072 (49.6 vs 49.8).
# 16 k is the line between 8 k (loses) and 16-32 k (wins), not measured on its own.
# Its list holds the k-th largest's 11-bit bin, MIN_LIST entries or more: for N(0, 1) scores that bin holds ~300-900
# entries at widths 8192-32768 and ~600 (k 512) to ~2100 (k 2048) at 131072; for uniform scores 12.5% of the row.
# A bin over the list is still exact: the select and the marking read the row again (2-4 more reads).
# TWO_PASS_SAMPLED: rows long enough to sample (two_pass_sample_target) first try one read that lists the elements
# above a sampled cutoff, as topk_row's streaming chunks filter (2026-12-03, H200, against the two reads: persistent
# 256 x 32768 k 512 27.5 -> 19.6 us, prefill 8192 x 32768 542 -> 512, 2048 x 16384 k 512 76.5 -> 67.4; with the next
# slots in flight during the appends, passing elements loaded again: 20.4, 513, 69.9, and 128 x 131072 34.2 against
# 30.4). With it the kernel also wins at 128 rows, so it takes calls of more rows than half the SMs: persistent 128 x
# 131072 34.3 -> 30.4 (topk_row -> sampled), decode 31.9 against 36.3; at 64 rows (more than a quarter of the SMs)
# decode 64 x 65536 k 512 gained (19.8 -> 18.7) but persistent 64 x 20000 k 512 (11.2 -> 13.3) and prefill 64 x 65536
# k 2048 (20.0 -> 21.1) lost. Without it (TWO_PASS_SAMPLED off) the two reads take only calls of more rows than SMs
# (TWO_PASS_ROWS_PER_SM_TWO_READS).
TWO_PASS_ROWS_PER_SM = 0.5
TWO_PASS_ROWS_PER_SM_TWO_READS = 1
TWO_PASS_WIDTH_PER_K = 16
MIN_LIST = 512
TWO_PASS_SAMPLED = True
# Streaming CTAs filter a long chunk from its start by a cutoff sampled from it (common/topk.cuh: sample_cutoff),
# aimed at SAMPLE_PER_K x k survivors and at least SAMPLE_MIN_RANK of its 2048 samples (fewer would let an unlucky
# sample leave under k survivors: the chunk is then read again); only chunks of 4 x that target and 8192 or more.
# H200, persistent 128 x 131072 k 2048: 48.2 us without, 42.2 with (the float-compare filter; with the earlier
# key-per-element filter 50.3 without, 47.5 at 2 k, 48.7 at 3 k), 34.6 with the sample read in runs before the
# chunk's copies (load_sample; decode 128 x 131072: 43.7 -> 37.1). Whole chunks keep their keys-only buffer: a sampled
# streaming one instead was slower (64 x 20000 15.0 vs 12.4 us, 32 x 163840 47.5 vs 42.2). SAMPLE_PER_K = 0: none
# (here and in the two-pass kernel's one-read try).
SAMPLE_PER_K = 2
SAMPLE_MIN_RANK = 64
SAMPLES = 2048  # common/topk.cuh: kSample
# The two-pass kernel's sampled read aims lower: k plus TWO_PASS_SAMPLE_SIGMAS standard deviations of the count a
# sampled cutoff lets through (two_pass_sample_target), so rows from ~5 k wide read once where 2 k asked 8 k. H200
# (2026-12-03, bench/tune.py, prefill, target 2 k / 1.25 k / 1.5 k): 8192 x 32768 k 2048 515 / 481 / 495 us,
# 2048 x 16384 k 512 67.4 / 72.2 / 65.5; 1.25 k is 2.5 deviations there but 1.8 at k 512, where reads fell back.
# 2.5 deviations rather than 3 (H100, session 39, A/B in one run, two rounds): prefill 8192 x 32768 292.9 -> 290.8
# us (target 2668 -> 2554), 2048 x 16384 k 512 48.95 -> 48.8 (744 -> 699). The persistent and decode calls of the
# suites keep their plans: their targets are SAMPLE_MIN_RANK's floor (128 x 131072: 4096, 256 x 32768: 1024).
TWO_PASS_SAMPLE_SIGMAS = 2.5
# Each row of a two-pass call aims its sampled read at its own length's deviations target (common/topk_two_pass.cuh:
# row_sample_target), not the plan's width's, which rows shorter than the width overshoot, but at least the width's
# SAMPLE_MIN_RANK floor: over the 8192 x 32768 prefill's rows (lengths 4-32768, k 2048) the sampled ones' mean target
# falls from 2554 to 2439, and the 251 rows 9212-10212 long sample instead of reading twice (5890 rows sample, not
# 5639). H100, A/B in one run (session 42, two rounds, us): prefill 8192 x 32768 294.8 / 294.9 -> 294.2 / 294.3 (with
# TWO_PASS_SAMPLE_SIGMAS 2.25 as well 294.3 / 294.4), 2048 x 16384 k 512 49.42 / 49.50 -> 49.56 / 49.42. A floor
# scaled to each row's length (64 of its 2048 sample ranks) cost persistent 128 x 131072 30.42 -> 30.49 and decode
# 30.77 -> 30.82 (their targets are the floor): with the width's floor those calls keep the plan's target in every
# row.
TWO_PASS_ROW_TARGETS = True
# The two-pass kernel's CTAs: 256 threads (five an SM: TWO_PASS_CTAS) for rows up to SMALL_CHUNK wide, and up to
# TWO_PASS_SMALL_WIDTH when the rows fill four such CTAs an SM; else 512 (two an SM) up to 65536. Its sampled read
# where the list holds TWO_PASS_LIST_PER_SAMPLE x its target (the target is already k + TWO_PASS_SAMPLE_SIGMAS
# deviations of the count; a list it overflows is exact too, just slower). A row's fixed work (sample select, rounds,
# scans, ~30 barriers) is the same at any CTA size, so more and smaller CTAs overlap more of it where rows queue for
# the SMs. H200 (2026-12-03, bench/tune.py, 512 -> 256 threads, list at 2 -> 1.2 x the target; the 256-thread list
# holds 1.3 x it at width 32768): prefill 8192 x 32768 k 2048 476.6 -> 370.7 us; but persistent 256 x 32768 k 512, one
# wave of rows, 18.7 -> 24.2 (a row's 256 threads, not 512). ncu of the 512-thread prefill: 300M warp instructions
# (vLLM's kernel, three 512-thread CTAs an SM at 40 registers: 274M), barrier and wait stalls 41%.
TWO_PASS_SMALL_WIDTH = 32768
TWO_PASS_LIST_PER_SAMPLE = 1.15
# The two-pass CTAs an SM, by CTA size: the shared memory each plans for (the 256-thread kernel's register bound is
# common/topk.cuh's kTwoPassCtas256, which must allow as many). Five 256-thread CTAs (48 registers, not 64; the
# list at TWO_PASS_LIST_PER_SAMPLE 1.15 of the target, not 1.2, so that 8192 x 32768's fits their shared memory):
# H100, A/B in one run (session 36), against four: prefill 8192 x 32768 k 2048 330.8 -> 319.6 us with 80-byte
# spills (NVRTC 13.0), 331.0 -> 315.5 with 40 (the re-reads of an overflowed list one slot a thread at a time);
# 2048 x 16384 k 512 56.2 -> 56.0-56.2. No spill since: their CTAs compile no ring (TWO_PASS_RING_THREADS). Six
# since session 47 (40 registers, no spill; 16-bit list columns, two_pass_entry_bytes, so the 8192 x 32768 list
# holds 2986 entries, 1.17 x the target): H100, A/B in one run, two rounds, against five with 8-byte entries: prefill
# 8192 x 32768 294.4 / 294.1 -> 290.4 / 290.7 us, 2048 x 16384 k 512 49.7 / 49.6 -> 48.2 / 48.2 (16-bit columns at
# five: 294.0 / 294.3, 49.7 / 49.6).
TWO_PASS_CTAS = {256: 6, 512: 2, 1024: 1}
# The sampled read stages its next batch of slots (16 bytes x 4 or 2 a thread) in shared memory with cp.async while
# it appends the batch before (stages = 1: common/topk_two_pass.cuh), where the list keeps room for
# TWO_PASS_LIST_PER_SAMPLE x the target beside that ring (two_pass_ring_entries: the list's last entries in that
# read; its two reads after an unlucky sample have the whole list), in CTAs of TWO_PASS_RING_THREADS or more: in the
# suites the 1024- and 512-thread CTAs (128 x 131072, 256 x 32768; at four 256-thread CTAs an SM it cost 2048 x
# 16384 k 512 55.8-55.9 -> 56.2-56.3 us, session 36, and five leave it no room). H100, A/B in one run each (session
# 35; the read with nothing listed ran at ~93% of copy bandwidth, the appends added 3.7 us): 128 x 131072 k 2048
# 32.6 -> 32.3 us, and on the kept kernels 32.1 -> 31.8-31.9 (persistent, decode; one round), 256 x 32768 k 512
# 18.4 either way.
TWO_PASS_RING = True
# (A ring of two batches, session 37: 128 x 131072 k 2048 31.9-32.0 -> 32.8-32.9 us, H100, A/B in one run; removed.)
TWO_PASS_RING_THREADS = 512  # common/topk_two_pass.cuh: kTwoPassRingThreads (smaller CTAs compile no ring)
# Launches are programmatic dependent launches on sm_90 (LaunchConfig.dependent; the kernels wait for the previous
# grids before their first global read): a call's CTAs are scheduled while the previous kernel on the stream ends.
DEPENDENT_LAUNCH = True


class CtaShapes(NamedTuple):
    """(threads, CTAs per SM) tried in order: a whole chunk in any of `whole` before streaming in `streaming`."""

    whole: tuple
    streaming: tuple


# Keyed by (the grid exceeds the SMs, the chunk is small: see SMALL_CHUNK). Many rows: 256-thread CTAs, five, four
# or three per SM, where the whole chunk fits their share of shared memory, else two 512-thread CTAs per SM. Few
# rows: one CTA per SM, of 256 threads for small chunks, else 1024 (512 when k leaves no room for 1024 threads'
# group). Five an SM take the whole-chunk kernel's 40 registers (WHOLE_INSTANTIATIONS; whole chunks have no ring
# since session 36, so an 8192-wide row's keys, 32 KB, fit a fifth of the SM). H100, A/B in one run (session 36),
# against four: prefill 4096 x 8192 k 2048 64.6-64.9 -> 59.5-59.6 us, persistent 1024 x 8192 25.9 -> 25.4.
CTA_SHAPES = {(True, True): CtaShapes(((256, 5), (256, 4), (256, 3), (512, 2)), ((512, 2),)),
              (True, False): CtaShapes(((512, 2),), ((512, 2),)),
              (False, True): CtaShapes(((256, 1),), ((1024, 1), (512, 1))),
              (False, False): CtaShapes(((1024, 1), (512, 1)), ((1024, 1), (512, 1)))}
STATIC_SMEM = 11776       # bound on the kernel's static shared memory (topk::Shared is 11680 bytes; 128-byte units)
RESERVED_SMEM = 1024      # shared memory the driver reserves per CTA (sm_80 and later)
NAN_KEY = 0xFF800001      # common/topk.cuh: float_key(NaN), one above +inf's key


# ---- the rows' plan -------------------------------------------------------------------------------------------------


class RowPlan(NamedTuple):
    """How rows are cut: `cluster` CTAs of `threads` per row; each CTA has a buffer of `cap` entries: keys only (4
    bytes each) when the whole chunk fits (stage = 0, stages = 0: no ring), else keys and columns (8 bytes) plus a
    staging area of `stage` = k entries and a copy ring of `stages` groups (32 bytes a thread each);
    `shared_bytes` of dynamic shared memory in all. `two_pass`: one CTA a row reads it once (sampled) or twice
    (common/topk_two_pass.cuh); `cap` is its list's entries (stage = 0; stages = 1 where its sampled read stages its
    next batch in shared memory, the list's last entries: TWO_PASS_RING; the k outputs are staged over the list).
    `sample`: the survivors a sampled cutoff aims at in streaming CTAs and in the two-pass kernel's one-read try (0:
    none); there, with `sample_spread` > 0, each row aims at its own length's target, at least `sample_floor` (the
    width's SAMPLE_MIN_RANK floor) and at most `sample` (TWO_PASS_ROW_TARGETS). `registers`: a CTA holds its whole
    chunk in registers (common/topk_registers.cuh; no dynamic shared memory)."""

    threads: int
    cluster: int
    stages: int
    cap: int
    stage: int
    shared_bytes: int
    two_pass: bool = False
    sample: int = 0
    registers: bool = False
    sample_spread: float = 0.0
    sample_floor: int = 0


def chunk_bound(width: int, cluster: int) -> int:
    """The most elements one of `cluster` CTAs streams from a row of at most `width`: the kernel splits a row's
    4-element aligned slots (up to 3 elements of misalignment) evenly over the cluster."""
    slots = (width + 3 + 3) // 4
    return 4 * -(-slots // cluster)


def _sample_floor(chunk: int) -> int:
    """The survivors SAMPLE_MIN_RANK of a chunk's SAMPLES sampled ranks stand for: the least target aimed at."""
    return -(-SAMPLE_MIN_RANK * chunk // SAMPLES)


def _sampled_target(chunk: int, wanted: int) -> int:
    """`wanted` survivors, or SAMPLE_MIN_RANK sample ranks if more, for chunks of up to `chunk` elements; 0 (none)
    for chunks under 4 x that or 4 x SAMPLES (the kernels check each chunk), or with SAMPLE_PER_K = 0."""
    target = max(wanted, _sample_floor(chunk))
    return target if SAMPLE_PER_K > 0 and chunk >= max(4 * target, 4 * SAMPLES) else 0


def sample_target(chunk: int, k: int) -> int:
    """Survivors a streaming CTA's sampled cutoff aims at for chunks of up to `chunk` elements, 0 for none."""
    return _sampled_target(chunk, SAMPLE_PER_K * k)


def two_pass_sample_target(width: int, k: int) -> int:
    """The two-pass kernel's sampled-read target for rows of at most `width`, 0 for none: the least t with
    t - k >= TWO_PASS_SAMPLE_SIGMAS x sqrt(t x width / SAMPLES) (a cutoff at sample rank r lets ~r x width / SAMPLES
    elements through, give or take sqrt(r) x width / SAMPLES; shorter rows spread less), as `_sampled_target`."""
    return _sampled_target(width, two_pass_deviations_target(width, k))


def two_pass_deviations_target(width: int, k: int) -> int:
    """The least t with t - k >= TWO_PASS_SAMPLE_SIGMAS x sqrt(t x width / SAMPLES) (two_pass_sample_target before
    its floor and its bound on short rows; the kernel's row_sample_target computes the same for each row)."""
    spread = TWO_PASS_SAMPLE_SIGMAS * math.sqrt(width / SAMPLES)
    return math.ceil(((spread + math.sqrt(spread * spread + 4 * k)) / 2) ** 2)


def buffer_plan(width: int, k: int, threads: int, cluster: int, per_sm_target: int, optin: int,
                per_sm: int, streaming: bool) -> RowPlan | None:
    """One CTA's shared memory, or None when it does not fit. Not `streaming`: the buffer holds the whole chunk
    within the budget of `per_sm_target` CTAs per SM (no shrink ever happens) and no ring (the chunk is copied
    straight into it, the emission compacts in place), where a lone CTA would still have room for MIN_WHOLE_STAGES
    of one. `streaming`: max(k + 8 * threads, what the budget leaves) entries and a k-entry stage (None when k
    leaves no room). The copy ring keeps stages - 1 groups in flight: RING_STAGES[threads] stages, fewer when the
    chunk has fewer groups or the buffer needs the room, more when the output (4 k bytes, staged in the ring)
    needs them. The kernel packs buffer counts in 16 bits: cap <= MAX_CAP."""
    chunk = chunk_bound(width, cluster)
    groups = max(1, -(-(chunk // 4) // (2 * threads)))
    limit = optin - STATIC_SMEM
    budget = min(limit, per_sm // per_sm_target - RESERVED_SMEM - STATIC_SMEM)
    if not streaming:  # keys only, copied straight in; a CTA alone on its SM leaves room for MIN_WHOLE_STAGES
        room = 32 * threads * min(MIN_WHOLE_STAGES, groups) if per_sm_target == 1 else 0
        if chunk <= MAX_CAP and room + 4 * chunk <= budget:
            return RowPlan(threads, cluster, 0, chunk, 0, 4 * chunk)
        return None
    most = max(min(groups, RING_STAGES[threads]), -(-4 * k // (32 * threads)))
    for stages in range(most, 0, -1):
        ring = 32 * threads * stages
        if ring < 4 * k:  # the ring stages the k outputs
            continue
        cap = max(-(-(k + 8 * threads) // 4) * 4, ((budget - ring) // 8 - k) // 4 * 4)  # 16-byte aligned arrays
        cap = min(cap, MAX_CAP)
        if ring + 8 * (cap + k) <= limit:
            return RowPlan(threads, cluster, stages, cap, k, ring + 8 * (cap + k), sample=sample_target(chunk, k))
    return None


def register_plan(width: int, k: int, threads: int, cluster: int) -> RowPlan | None:
    """The row-in-registers CTA for chunks of rows of at most `width`, or None when a chunk exceeds its slots (or
    REGISTER_ROWS is off): no dynamic shared memory (its threads store their outputs themselves)."""
    if REGISTER_ROWS and chunk_bound(width, cluster) // 4 <= REGISTER_SLOTS[threads] * threads:
        return RowPlan(threads, cluster, 0, 0, 0, 0, registers=True)
    return None


def two_pass_plan(rows: int, width: int, k: int, sms: int, optin: int, per_sm: int) -> RowPlan | None:
    """The two-pass kernel's CTA for rows of at most `width`, or None when its list would be under MIN_LIST (or
    4 x k bytes): 256 threads for rows up to SMALL_CHUNK (TWO_PASS_SMALL_WIDTH where there are 4 x sms rows or more),
    512 up to 65536, 1024 beyond, and 1024 when the rows fit the SMs once (one CTA an SM: 128 x 131072),
    TWO_PASS_CTAS of them an SM; bitmaps of two_pass_words(width) words (`sel`, `eq`) and the rest of the CTA's share
    of the SM's shared memory for the list (two_pass_entry_bytes an entry; the k outputs are staged over it); its
    sampled read's target where TWO_PASS_SAMPLED and the list holds TWO_PASS_LIST_PER_SAMPLE x it."""
    small = width <= SMALL_CHUNK or (width <= TWO_PASS_SMALL_WIDTH and rows >= 4 * sms)
    threads = 1024 if rows <= sms or width > 65536 else 256 if small else 512
    budget = min(optin, per_sm // TWO_PASS_CTAS[threads] - RESERVED_SMEM) - STATIC_SMEM
    fixed = 8 * two_pass_words(width)
    entry = two_pass_entry_bytes(threads)
    cap = min((budget - fixed) // entry, MAX_CAP)  # (eq bits of list entries are counted in 16 bits)
    if cap < max(MIN_LIST, -(-4 * k // entry)):  # the k outputs are staged over the list's keys and columns
        return None
    # The sampled read only where the list has room to spare: a list it overflows costs that read and the two reads
    # after it (rows of ~500K and more).
    sample = two_pass_sample_target(width, k) if TWO_PASS_SAMPLED else 0
    if TWO_PASS_LIST_PER_SAMPLE * sample > cap:
        sample = 0
    ring = (TWO_PASS_RING and threads >= TWO_PASS_RING_THREADS and sample > 0
            and TWO_PASS_LIST_PER_SAMPLE * sample <= cap - two_pass_ring_entries(threads))
    spread, floor = (TWO_PASS_SAMPLE_SIGMAS / math.sqrt(SAMPLES), _sample_floor(width)) if (
        TWO_PASS_ROW_TARGETS and sample > 0) else (0.0, 0)
    return RowPlan(threads, 1, int(ring), cap, 0, fixed + entry * cap, two_pass=True, sample=sample,
                   sample_spread=spread, sample_floor=floor)


def two_pass_words(width: int) -> int:
    """Words of each of the two-pass kernel's bitmaps for rows up to `width`: ceil(width / 32) rounded up to even,
    so its list after them is 16-byte aligned (common/topk_two_pass.cuh: two_pass_words)."""
    return 2 * -(-width // 64)


def two_pass_entry_bytes(threads: int) -> int:
    """Bytes of a two-pass list entry: a 32-bit key and a column of 16 bits in CTAs without a ring (rows at most
    TWO_PASS_SMALL_WIDTH wide), else of 32 bits (common/topk_two_pass.cuh: ListColumn)."""
    return 6 if threads < TWO_PASS_RING_THREADS else 8


def sampled_unroll(threads: int) -> int:
    """16-byte slots a thread of the two-pass kernel's sampled read loads (and stages) a batch: the kernel's
    sampled_unroll<THREADS>() (common/topk_two_pass.cuh; tests/test_topk_plan.py checks they agree)."""
    return 2 if threads >= 1024 else 4


def two_pass_ring_entries(threads: int) -> int:
    """List entries the sampled read's ring takes (stages = 1): a batch of sampled_unroll(threads) 16-byte slots a
    thread, 16-byte aligned."""
    return 4 * sampled_unroll(threads) * threads + 3


class NoRowPlan(ValueError):
    """No CTA shape holds k's staged outputs and buffer in this GPU's shared memory: GPUs with 99 KB a block (sm_86,
    sm_89) take rows wider than their whole-chunk buffer (~8K scores) only up to k = 2528; 163 KB (A100) and 227 KB
    (H100, H200) every k up to MAX_K. The ops reject their k argument with this message."""


class RowKernels(NamedTuple):
    """An op's row kernels: `buffer[threads, cluster]` (topk_row), `whole[threads, cluster]` (topk_row compiled
    for whole chunks only, WHOLE_INSTANTIATIONS), `two_pass[threads]`, `registers[threads, cluster]`
    (topk_row_registers)."""

    buffer: dict
    whole: dict
    two_pass: dict
    registers: dict

    def all(self) -> list:
        return [*self.buffer.values(), *self.whole.values(), *self.two_pass.values(), *self.registers.values()]


def plan_rows(kernels: RowKernels, device: int, rows: int, width: int, k: int,
              contiguous: bool = True) -> tuple[Kernel, LaunchConfig, RowPlan]:
    """Kernel, launch configuration and shared memory for `rows` rows of at most `width` elements (host scalars
    only, so a CUDA graph replays it with any lengths). On sm_90 a row gets a cluster of up to 16 CTAs while
    2 x rows x cluster fits the SMs, each CTA keeps >= MIN_CHUNK elements and the row is at least MIN_SPLIT_WIDTH
    wide, unless one register CTA holds it (WHOLE_REGISTER_ROWS); a cluster shape the GPU cannot hold is halved;
    CTA_SHAPES lists the CTA sizes and occupancies tried, the row-in-registers kernel first where the grid fits the
    SMs and a whole chunk fits its slots. But calls of many wide rows (TWO_PASS_ROWS_PER_SM, TWO_PASS_WIDTH_PER_K)
    take the two-pass kernel where its plan fits and the rows are `contiguous` (unit column stride)."""
    sms = launcher.device_attribute(device, "sm_count")
    optin = launcher.device_attribute(device, "max_shared_memory_per_block_optin")
    per_sm = launcher.device_attribute(device, "max_shared_memory_per_sm")
    rows_per_sm = TWO_PASS_ROWS_PER_SM if TWO_PASS_SAMPLED else TWO_PASS_ROWS_PER_SM_TWO_READS
    two_pass = contiguous and rows > rows_per_sm * sms and width >= TWO_PASS_WIDTH_PER_K * k
    row = two_pass_plan(rows, width, k, sms, optin, per_sm) if two_pass else None
    dependent = DEPENDENT_LAUNCH and launcher.device_arch(device) >= 90
    if row is not None:
        return kernels.two_pass[row.threads], LaunchConfig((rows, 1, 1), (row.threads, 1, 1), row.shared_bytes,
                                                           dependent=dependent), row
    cluster = 1
    # A row one CTA holds in its registers stays whole (WHOLE_REGISTER_ROWS).
    whole_row = WHOLE_REGISTER_ROWS and rows <= sms and register_plan(width, k, 1024, 1) is not None
    if launcher.device_arch(device) >= 90 and not whole_row:
        while (cluster < MAX_CLUSTER and rows * cluster * 2 <= sms
               and width >= cluster * 2 * MIN_CHUNK and width >= MIN_SPLIT_WIDTH):
            cluster *= 2
    while True:
        many, chunk = rows * cluster > sms, chunk_bound(width, cluster)
        small = chunk <= SMALL_CHUNK if many else (cluster >= 4 and chunk <= SMALL_CLUSTER_CHUNK)
        shapes = CTA_SHAPES[many, small]
        registers = [register_plan(width, k, t, cluster) for t, _ in shapes.whole] if not many else []
        row = next(filter(None, [*registers, *(buffer_plan(width, k, t, cluster, n, optin, per_sm, streaming)
                                               for streaming, candidates in ((False, shapes.whole),
                                                                             (True, shapes.streaming))
                                               for t, n in candidates)]), None)
        if row is None:
            raise NoRowPlan(f"= {k} needs more shared memory per block than the {optin} bytes this GPU allows "
                            f"for rows {width} wide")
        by_shape = kernels.registers if row.registers else kernels.buffer
        if (row.threads, cluster) not in by_shape:  # 512-thread CTAs are instantiated without clusters
            cluster //= 2
            continue
        kernel = by_shape[row.threads, cluster]
        if not row.registers and row.stage == 0:  # a whole chunk: the kernel without the streaming path, if any
            kernel = kernels.whole.get((row.threads, cluster), kernel)
        config = LaunchConfig((rows * cluster, 1, 1), (row.threads, 1, 1), row.shared_bytes,
                              None if cluster == 1 else (cluster, 1, 1))
        if cluster == 1 or launcher.max_active_clusters(kernel, device, config) > 0:
            return kernel, config._replace(dependent=dependent), row
        cluster //= 2


# ---- reference (also the CPU kernel) -------------------------------------------------------------------------------


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """The kernel's order-preserving keys of float32 `x`, as int64 in [0, 2^32): larger value <=> larger key; -0 and
    +0 share a key; every NaN gets NAN_KEY, one above +inf's."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where(x == 0, torch.zeros_like(bits), bits)
    keys = torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return torch.where(x.isnan(), torch.full_like(keys, NAN_KEY), keys)


def select_rows_ref(logits: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k] int32: per row r, the k columns of logits[r, starts[r] : starts[r] + lengths[r]] (int64 [rows],
    inside the row) with the largest keys, ties to the lowest column, minus starts[r], ascending, then -1."""
    rows, width = logits.shape
    rel = torch.arange(width, device=logits.device)[None, :] - starts[:, None]
    inside = (rel >= 0) & (rel < lengths[:, None])
    keys = torch.where(inside, float_keys(logits), torch.full((), -1, dtype=torch.int64, device=logits.device))
    if width < k:
        keys = torch.cat([keys, keys.new_full((rows, k - width), -1)], dim=1)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    chosen = keys.gather(1, order) >= 0
    absent = torch.iinfo(torch.int64).max
    picked = torch.where(chosen, order - starts[:, None], torch.full_like(order, absent)).sort(dim=1).values
    return torch.where(picked == absent, torch.full_like(picked, -1), picked).to(torch.int32)


# ---- the ops' kernels and shared argument checks --------------------------------------------------------------

def row_kernels(filename: str, kernel: str) -> RowKernels:
    """The row kernels of `filename`, whose templates are named `kernel`, `kernel`_two_pass and `kernel`_registers."""
    return RowKernels(
        {(t, c): Kernel(filename, f"cupy_ops::{kernel}<{t}, {c}>") for t, c in INSTANTIATIONS},
        {(t, c): Kernel(filename, f"cupy_ops::{kernel}<{t}, {c}, true>") for t, c in WHOLE_INSTANTIATIONS},
        {t: Kernel(filename, f"cupy_ops::{kernel.replace('_kernel', '_two_pass_kernel')}<{t}>")
         for t in TWO_PASS_THREADS},
        {(t, c): Kernel(filename, f"cupy_ops::{kernel.replace('_kernel', '_registers_kernel')}<{t}, {c}, "
                                  f"{REGISTER_SLOTS[t]}>") for t, c in INSTANTIATIONS})


def check_k_and_width(c: Call, k_name: str, out_name: str, width: int) -> None:
    """k (argument `k_name`) in [1, MAX_K] and the output's column count; at most MAX_ROWS rows of at most MAX_WIDTH
    scores."""
    k = getattr(c, k_name)
    if not 1 <= k <= MAX_K:
        c.reject(k_name, f"= {k} must be in [1, {MAX_K}]")
    if c.dims["k"] != k:
        c.reject(out_name, f"has {c.dims['k']} columns; expected {k_name} = {k}")
    if width > MAX_WIDTH:
        c.reject("logits", f"has {width} columns; at most {MAX_WIDTH} are supported (int32 indices)")
    if c.dims["rows"] > MAX_ROWS:
        c.reject("logits", f"has {c.dims['rows']} rows; at most {MAX_ROWS} are supported (one CTA or more a row)")


def check_lengths(c: Call, name: str, count: int, dims: tuple = (1,)) -> None:
    """Argument `name` is a contiguous int tensor with `dims` dimensions and at least `count` elements."""
    t = getattr(c, name)
    if len(t.shape) not in dims:
        c.reject(name, f"must have {' or '.join(map(str, dims))} dimensions, got shape {t.shape}")
    if t.numel < count:
        c.reject(name, f"has {t.numel} elements; expected at least {count}")
    expected, stride = [], 1
    for size in reversed(t.shape):  # contiguous: the kernel reads element i at i
        expected.insert(0, stride)
        stride *= size
    if any(s != e for s, e, size in zip(t.strides, expected, t.shape) if size > 1):
        c.reject(name, f"must be contiguous, got strides {t.strides}")
