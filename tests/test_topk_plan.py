"""The top-k plans on the CPU, with the driver's answers faked for an H200, an H100 and an A100: cluster sizes,
block sizes, shared-memory budgets and the buffer invariants the kernel relies on (common/topk_row.cuh: cap >= a chunk
when nothing can be shrunk, cap >= k + 8 x threads with a k-entry stage otherwise, 16-byte aligned arrays); the
static shared memory bound against ptxas; params packing. No GPU needed."""

from __future__ import annotations

import math

import pytest
import torch
from topk_utils import DECODE, PERSISTENT, PREFILL, decode_args, persistent_args, prefill_args
from topk_utils import each_row_kernel  # noqa: F401 - a fixture (test_each_row_kernel_makes_the_plans_take_its_kernel)

from cupy_ops._runtime import compiler, launcher
from cupy_ops.ops import persistent_topk as PT
from cupy_ops.ops import top_k_per_row as T
from cupy_ops.ops import topk_rows as R

GPUS = {  # sm_count, opt-in shared memory per block, per SM, arch
    "H200": (132, 232448, 233472, 90),
    "H100-PCIe": (114, 232448, 233472, 90),
    "A100": (108, 166912, 167936, 80),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, max_cluster=16): the driver's answers for that GPU; clusters above max_cluster do not fit."""

    def use(name, max_cluster=16):
        sms, optin, per_sm, arch = GPUS[name]
        values = {"sm_count": sms, "max_shared_memory_per_block_optin": optin, "max_shared_memory_per_sm": per_sm}
        monkeypatch.setattr(launcher, "device_attribute", lambda device, attr: values[attr])
        monkeypatch.setattr(launcher, "device_arch", lambda device: arch)
        monkeypatch.setattr(launcher, "max_active_clusters",
                            lambda kernel, device, config: 4 if config.cluster[0] <= max_cluster else 0)
        return sms, optin, per_sm, arch
    return use


# (rows, width, k): the issues' benchmark shapes and a few edges (one row, tiny rows, k = 4096)
SHAPES = [(1, 8192, 2048), (4, 163840, 2048), (128, 131072, 2048), (64, 65536, 512), (1, 163840, 2048),
          (32, 163840, 2048), (4, 65536, 1024), (256, 32768, 512), (4096, 8192, 2048), (8192, 32768, 2048),
          (2048, 16384, 512), (1024, 8192, 2048), (64, 20000, 512),
          (1, 1, 1), (3, 100, 4096), (2, 300000, 4096), (1000, 20000, 1), (7, 0, 16)]


def _plan_rows(rows, width, k):
    return R.plan_rows(T.KERNELS, 0, rows, width, k)


@pytest.mark.parametrize("gpu", list(GPUS))
@pytest.mark.parametrize("rows, width, k", SHAPES, ids=[f"{r}x{w}-k{k}" for r, w, k in SHAPES])
def test_buffers_fit_and_hold_what_the_kernel_assumes(fake_gpu, gpu, rows, width, k):
    sms, optin, per_sm, arch = fake_gpu(gpu)
    kernel, config, row = _plan_rows(rows, width, k)
    if row.two_pass:  # bitmaps of ceil(width / 32) words, rounded up to even, and the list (k staged over it)
        assert rows > sms / 2 and width >= 16 * k and kernel is T.KERNELS.two_pass[row.threads]
        # its one-read try: rows >= 4 x the target and 8192 wide, as streaming buffers (the kernel checks each row),
        # and a list of TWO_PASS_LIST_PER_SAMPLE x the target
        if row.sample:
            assert width >= max(4 * row.sample, 4 * R.SAMPLES) and row.sample > k and row.sample <= 2**26
            assert R.TWO_PASS_LIST_PER_SAMPLE * row.sample <= row.cap
        else:
            target = R.two_pass_sample_target(width, k)
            assert target == 0 or R.TWO_PASS_LIST_PER_SAMPLE * target > row.cap
        # the sampled read's ring (stages 1, CTAs of 512 threads or more) takes the list's last entries: what is left
        # still holds its target
        ring_room = R.TWO_PASS_LIST_PER_SAMPLE * row.sample <= row.cap - R.two_pass_ring_entries(row.threads)
        ring = row.sample > 0 and ring_room and row.threads >= R.TWO_PASS_RING_THREADS
        assert row.stages == int(ring) and row.cap < 65536  # (eq counts: 16 bits)
        assert config.grid == (rows, 1, 1) and config.block == (row.threads, 1, 1) and config.cluster is None
        # list entries of a 32-bit key and a column of 16 bits (CTAs without a ring: rows under 2^16) or 32
        entry = 6 if row.threads < R.TWO_PASS_RING_THREADS else 8
        assert R.two_pass_entry_bytes(row.threads) == entry and (entry == 8 or width <= 65536)
        assert row.cap >= R.MIN_LIST and entry * row.cap >= 4 * k and row.shared_bytes == config.shared_bytes
        assert row.shared_bytes == 8 * (-(-width // 32) + (-(-width // 32)) % 2) + entry * row.cap
        assert row.shared_bytes + R.STATIC_SMEM <= optin
        ctas = R.TWO_PASS_CTAS[row.threads]
        assert ctas * (row.shared_bytes + R.STATIC_SMEM + R.RESERVED_SMEM) <= per_sm and ctas * row.threads <= 2048
        return
    assert config.grid == (rows * row.cluster, 1, 1) and config.block == (row.threads, 1, 1)
    assert config.cluster == (None if row.cluster == 1 else (row.cluster, 1, 1))
    assert row.cluster == 1 or arch >= 90
    if row.registers:  # a whole chunk in the threads' slots; no dynamic shared memory
        assert kernel is T.KERNELS.registers[row.threads, row.cluster]
        assert R.chunk_bound(width, row.cluster) <= 4 * R.REGISTER_SLOTS[row.threads] * row.threads
        assert row.shared_bytes == config.shared_bytes == 0
        return
    # whole chunks take the kernel without the streaming path where it is instantiated (five 256-thread CTAs an SM)
    whole_kernel = row.stage == 0 and (row.threads, row.cluster) in R.WHOLE_INSTANTIATIONS
    assert kernel is (T.KERNELS.whole if whole_kernel else T.KERNELS.buffer)[row.threads, row.cluster]
    assert row.cap % 4 == 0
    assert row.shared_bytes + R.STATIC_SMEM <= optin and row.shared_bytes == config.shared_bytes
    assert row.cap <= R.MAX_CAP  # counts packed in 16 bits
    if row.stage == 0:  # the whole chunk is buffered, keys only: no shrink can happen, no ring
        assert row.cap >= R.chunk_bound(width, row.cluster) and row.stages == 0
        assert row.shared_bytes == 4 * row.cap
    else:  # after a shrink to k entries, one group of 8 x threads elements fits; the ring stages the output
        assert 1 <= row.stages <= 3 and 32 * row.threads * row.stages >= 4 * k
        assert row.stage == k and row.cap >= k + 8 * row.threads
        assert row.shared_bytes == 32 * row.threads * row.stages + 8 * (row.cap + row.stage)
    chunk = R.chunk_bound(width, row.cluster)
    # a sampled cutoff only for streaming buffers of chunks >= 4 x its target and 8192, at least 2 k survivors and
    # 64 samples aimed at (the kernel's own bound: sample <= 2^26)
    if row.sample:
        assert row.stage > 0 and chunk >= max(4 * row.sample, 4 * R.SAMPLES)
        assert row.sample >= 2 * k and row.sample * R.SAMPLES >= 64 * chunk and row.sample <= 2**26
    else:
        assert row.stage == 0 or chunk < max(4 * 2 * k, 4 * R.SAMPLES, 4 * -(-64 * chunk // R.SAMPLES))
    if chunk <= R.SMALL_CLUSTER_CHUNK and row.cluster >= 4:  # rows cut in small shares: 256 threads
        assert row.threads == 256
    if rows * row.cluster > sms:  # many CTAs: at least two per SM where 228 KB per SM allow it (not k = 4096)
        assert row.threads in (256, 512)
        resident = 3 if row.threads == 256 else 2  # 256-thread CTAs are planned at five, four or three an SM
        assert resident * (row.shared_bytes + R.STATIC_SMEM + R.RESERVED_SMEM) <= per_sm or gpu == "A100" or k == 4096


def test_cluster_sizes_on_h200(fake_gpu):
    fake_gpu("H200")
    cluster = {shape: _plan_rows(*shape)[2].cluster for shape in SHAPES}
    assert cluster[1, 163840, 2048] == cluster[4, 163840, 2048] == cluster[4, 65536, 1024] == 16
    # 32 x 163840: whole 40960-element chunks in 4 CTAs would have a one-stage ring (MIN_WHOLE_STAGES): pairs stream
    assert cluster[32, 163840, 2048] == 2 and cluster[64, 65536, 512] == 2 and cluster[1, 8192, 2048] == 1
    assert cluster[128, 131072, 2048] == 1 and cluster[4096, 8192, 2048] == 1 and cluster[256, 32768, 512] == 1


def test_five_256_thread_ctas_an_sm_where_their_shared_memory_fits(fake_gpu):
    """On an H200 the 4096 x 8192 prefill's whole chunks (no ring) and 8192 x 32768's two-pass CTAs, whose list
    still holds its sampled read's target, fit a fifth of the SM each; the whole chunks take the kernel compiled
    without the streaming path (40 registers: five fit)."""
    sms, optin, per_sm, arch = fake_gpu("H200")
    for shape, two_pass in (((4096, 8192, 2048), False), ((8192, 32768, 2048), True)):
        kernel, config, row = _plan_rows(*shape)
        assert row.threads == 256 and row.two_pass == two_pass
        assert 5 * (config.shared_bytes + R.STATIC_SMEM + R.RESERVED_SMEM) <= per_sm
        assert kernel is (T.KERNELS.two_pass[256] if two_pass else T.KERNELS.whole[256, 1])
        assert row.sample > 0 or not two_pass


def test_many_wide_rows_take_the_two_pass_kernel(fake_gpu):
    """More rows than half the SMs, each at least 16 k wide (and contiguous): one CTA a row, 256 threads for rows up
    to SMALL_CHUNK, and up to TWO_PASS_SMALL_WIDTH where the rows fill four CTAs an SM, 512 up to 65536, 1024 when
    the rows fit the SMs; everything else stays on topk_row. Rows of 8192 and more try the sampled read first."""
    fake_gpu("H200")
    rows = {shape: _plan_rows(*shape)[2] for shape in SHAPES}
    two_pass = {shape for shape, row in rows.items() if row.two_pass}
    assert two_pass == {(128, 131072, 2048), (256, 32768, 512), (8192, 32768, 2048), (2048, 16384, 512),
                        (1000, 20000, 1)}
    assert rows[2048, 16384, 512].threads == rows[8192, 32768, 2048].threads == 256  # 2048 rows fill 4 x 132
    assert rows[256, 32768, 512].threads == 512  # one wave: a row's latency, not the queue, sets the time
    assert rows[128, 131072, 2048].threads == 1024
    assert all(rows[shape].sample > 0 for shape in two_pass)
    # the sampled read stages its next batch where the list has room beside the ring (not in 5 x 256 threads an SM)
    assert {shape for shape in two_pass if rows[shape].stages} == {(128, 131072, 2048), (256, 32768, 512)}
    assert not R.plan_rows(T.KERNELS, 0, 256, 32768, 512, contiguous=False)[2].two_pass


def test_without_the_sampled_read_two_reads_take_only_more_rows_than_sms(fake_gpu, monkeypatch):
    """TWO_PASS_SAMPLED off: no two-pass plan samples, and the two reads take only calls of more rows than SMs (the
    sampled read also takes 128 x 131072). Plans do not depend on the NVRTC major: CUDA 12 and 13 builds both compile
    the sampled read."""
    fake_gpu("H200")
    monkeypatch.setattr(R, "TWO_PASS_SAMPLED", False)
    rows = {shape: _plan_rows(*shape)[2] for shape in SHAPES}
    two_pass = {shape for shape, row in rows.items() if row.two_pass}
    assert two_pass == {(256, 32768, 512), (8192, 32768, 2048), (2048, 16384, 512), (1000, 20000, 1)}
    assert all(rows[shape].sample == 0 for shape in two_pass)
    assert "__CUDACC_VER_MAJOR__" not in (compiler.kernel_dir() / "common" / "topk_two_pass.cuh").read_text()


def test_the_sampled_read_needs_room_in_the_list(fake_gpu):
    """The two-pass kernel samples only where its list holds TWO_PASS_LIST_PER_SAMPLE x the target: the benchmark
    shapes do, and so does k 4096 at 65536 (1.65 x); rows of ~500K and more would overflow it (then pay the sampled
    read and the two reads)."""
    sms, optin, per_sm, _ = fake_gpu("H200")
    for rows, width, k in ((128, 131072, 2048), (256, 32768, 512), (8192, 32768, 2048), (2048, 16384, 512),
                           (4096, 65536, 4096), (200, 524288, 2048), (200, 786432, 2048)):
        row = R.two_pass_plan(rows, width, k, sms, optin, per_sm)
        target = R.two_pass_sample_target(width, k)
        assert target > 0 and row.sample == (target if R.TWO_PASS_LIST_PER_SAMPLE * target <= row.cap else 0), (
            rows, width, k)
        assert (row.sample > 0) == (width <= 131072), (rows, width, k)


@pytest.mark.parametrize("width, k", [(32768, 2048), (16384, 512), (65536, 1024), (131072, 2048), (10000, 64)])
def test_the_two_pass_target_clears_k_by_the_set_deviations(width, k):
    """A cutoff at sample rank r lets ~r x width / 2048 elements through, give or take sqrt(r) x width / 2048: the
    two-pass target is the least with TWO_PASS_SAMPLE_SIGMAS such deviations above k, or SAMPLE_MIN_RANK ranks (the
    last two)."""
    target = R.two_pass_sample_target(width, k)
    floor = -(-R.SAMPLE_MIN_RANK * width // R.SAMPLES)

    def deviations(t):
        return (t - k) / math.sqrt(t * width / R.SAMPLES)

    assert target >= floor and deviations(target) >= R.TWO_PASS_SAMPLE_SIGMAS
    assert target == floor or deviations(target - 1) < R.TWO_PASS_SAMPLE_SIGMAS
    assert width >= max(4 * target, 4 * R.SAMPLES)


def test_rows_under_four_two_pass_targets_read_twice():
    assert R.two_pass_sample_target(8192, 2048) == 0  # its target, 2288, is over a quarter of the row


def test_cta_sizes_on_h200(fake_gpu, monkeypatch):
    """Without the two-pass and the row-in-registers kernels: many short rows and rows cut in small cluster shares
    take 256-thread CTAs (four per SM when many); long streamed rows 512 (many) or 1024 (few), and so do few rows
    in large shares (latency-bound)."""
    fake_gpu("H200")
    monkeypatch.setattr(R, "TWO_PASS_ROWS_PER_SM", 2**31)
    monkeypatch.setattr(R, "TWO_PASS_ROWS_PER_SM_TWO_READS", 2**31)
    monkeypatch.setattr(R, "REGISTER_ROWS", False)
    threads = {shape: _plan_rows(*shape)[2].threads for shape in SHAPES}
    assert threads[4096, 8192, 2048] == threads[1024, 8192, 2048] == threads[4, 65536, 1024] == 256
    assert threads[8192, 32768, 2048] == threads[256, 32768, 512] == threads[2048, 16384, 512] == 512
    assert threads[128, 131072, 2048] == threads[32, 163840, 2048] == threads[4, 163840, 2048] == 1024
    assert threads[1, 8192, 2048] == threads[64, 20000, 512] == 1024
    per_sm = 233472 // (_plan_rows(4096, 8192, 2048)[2].shared_bytes + R.STATIC_SMEM + R.RESERVED_SMEM)
    assert per_sm >= 4


def test_whole_chunks_that_fit_the_slots_take_registers(fake_gpu):
    """On the H200, calls whose grid fits the SMs and whose CTA chunks fit REGISTER_SLOTS x threads slots take the
    row-in-registers kernel; longer chunks and calls of more CTAs than SMs keep the buffer (streaming or whole) or
    the two-pass kernel."""
    fake_gpu("H200")
    rows = {shape: _plan_rows(*shape)[2] for shape in SHAPES}
    registers = {shape: (row.threads, row.cluster) for shape, row in rows.items() if row.registers}
    assert registers == {(1, 8192, 2048): (1024, 1), (4, 163840, 2048): (1024, 16), (1, 163840, 2048): (1024, 16),
                         (4, 65536, 1024): (256, 16), (64, 20000, 512): (1024, 1), (2, 300000, 4096): (1024, 16),
                         (1, 1, 1): (1024, 1), (3, 100, 4096): (1024, 1), (7, 0, 16): (1024, 1)}


def test_rows_one_register_cta_holds_stay_whole(fake_gpu, monkeypatch):
    """Rows past MIN_SPLIT_WIDTH that one 1024-thread register CTA holds (20477 scores) stay whole while the grid fits
    the SMs; one score more, or WHOLE_REGISTER_ROWS off, and they split as before."""
    fake_gpu("H200")
    assert R.MIN_SPLIT_WIDTH < 20000
    assert _plan_rows(64, 20477, 512)[2][:2] == (1024, 1) and _plan_rows(1, 20000, 2048)[2][:2] == (1024, 1)
    assert _plan_rows(64, 20478, 512)[2].cluster == 2
    monkeypatch.setattr(R, "WHOLE_REGISTER_ROWS", False)
    assert _plan_rows(64, 20000, 512)[2][:3] == (1024, 2, 0)


def test_each_row_kernel_makes_the_plans_take_its_kernel(fake_gpu, each_row_kernel):
    """The GPU tests run once per row kernel through topk_utils' each_row_kernel fixture, which only the GPU runs
    use: its patches must reach the plans (they once named constants of a module the plans no longer read). 4 rows of
    8192, k 512: every kernel can take them."""
    fake_gpu("H200")
    row = _plan_rows(4, 8192, 512)[2]
    assert {"buffer": not row.registers and not row.two_pass, "registers": row.registers,
            "two-pass": row.two_pass}[each_row_kernel], row


def test_a_cluster_the_gpu_cannot_hold_is_halved(fake_gpu):
    fake_gpu("H200", max_cluster=8)
    assert _plan_rows(4, 163840, 2048)[2].cluster == 8


def test_sm80_never_uses_clusters(fake_gpu):
    fake_gpu("A100")
    assert {_plan_rows(*shape)[2].cluster for shape in SHAPES} == {1}


def test_sample_count_matches_the_kernel():
    """The plan's SAMPLES is common/topk.cuh's kSample (the sampled rank assumes it)."""
    assert f"constexpr int kSample = {R.SAMPLES};" in (compiler.kernel_dir() / "common" / "topk.cuh").read_text()


@pytest.mark.parametrize("arch", [80, 90])
def test_static_shared_memory_bound(arch):
    """STATIC_SMEM (budgeted by the plans) covers ptxas' static shared memory of every instantiation."""
    for kernel in (*PREFILL.kernels, *PERSISTENT.kernels):
        report = compiler.ptxas_report(kernel.source, kernel.name_expression, arch)
        assert 0 < report.shared_memory <= R.STATIC_SMEM, kernel


@pytest.mark.parametrize("arch", [80, 90])
def test_planned_ctas_an_sm_fit_the_kernels_registers(arch):
    """Every CTA shape the plans budget at n an SM (CTA_SHAPES, TWO_PASS_CTAS) compiles to registers n such CTAs
    can share (64K an SM, allocated 8 a thread at a time): the kernels' launch bounds (common/topk.cuh:
    kWholeCtas256, kTwoPassCtas256) and the plans' constants agree. Whole chunks take the whole-chunk kernel where
    it is instantiated (WHOLE_INSTANTIATIONS)."""
    for kernels in (T.KERNELS, PT.KERNELS):
        shapes = [(kernels.whole.get((t, 1), kernels.buffer[t, 1]), t, n)
                  for shape in R.CTA_SHAPES.values() for t, n in shape.whole]
        shapes += [(kernels.buffer[t, 1], t, n) for shape in R.CTA_SHAPES.values() for t, n in shape.streaming]
        shapes += [(kernels.two_pass[t], t, n) for t, n in R.TWO_PASS_CTAS.items()]
        for kernel, threads, per_sm in shapes:
            report = compiler.ptxas_report(kernel.source, kernel.name_expression, arch)
            assert -(-report.registers // 8) * 8 * threads * per_sm <= 65536, (kernel, per_sm, report.registers)


def test_ring_constants_match_the_kernel():
    """TWO_PASS_RING_THREADS is common/topk_two_pass.cuh's kTwoPassRingThreads (smaller CTAs compile no ring and
    list 16-bit columns: two_pass_entry_bytes), and sampled_unroll (the ring's batch, two_pass_ring_entries) is its
    sampled_unroll<THREADS>()."""
    text = (compiler.kernel_dir() / "common" / "topk_two_pass.cuh").read_text()
    assert f"constexpr int kTwoPassRingThreads = {R.TWO_PASS_RING_THREADS};" in text
    assert "using ListColumn = typename pick_type<(THREADS < kTwoPassRingThreads), uint16_t, uint32_t>::type;" in text
    assert R.sampled_unroll(512) == R.sampled_unroll(256) != R.sampled_unroll(1024)
    expected = f"return THREADS >= 1024 ? {R.sampled_unroll(1024)} : {R.sampled_unroll(512)}; }}"
    assert f"constexpr int sampled_unroll() {{ {expected}" in text


def _plan(op, args):
    call, _ = op.validate(args)
    return op.plan(call)


def test_plans_pack_into_the_params_structs(fake_gpu):
    fake_gpu("H200")
    logits = torch.randn(6, 1000)
    for op, args in ((PREFILL, prefill_args(logits, [0] * 6, [1000] * 6, 64, poison=None)),
                     (DECODE, decode_args(logits, 3, [1000, 900], 64, poison=None)),
                     (PERSISTENT, persistent_args(logits, [1000] * 6, 64, max_seq_len=500, poison=None))):
        (launch,) = _plan(op, args)
        assert launch.kernel in op.kernels
        assert len(launch.params.pack(launch.values)) == launch.params.size - 8 * len(launch.params.pointers)


def test_persistent_plan_depends_on_max_seq_len_not_lengths(fake_gpu):
    """The grid follows min(max_seq_len, W) (host scalars), never the lengths (device data)."""
    fake_gpu("H200")
    logits = torch.randn(4, 163840)
    short = _plan(PERSISTENT, persistent_args(logits, [10] * 4, 2048, max_seq_len=8000, poison=None))[0]
    long = _plan(PERSISTENT, persistent_args(logits, [10] * 4, 2048, poison=None))[0]
    assert short.values["max_len"] == 8000 and long.values["max_len"] == 163840
    assert short.config.cluster is None and long.config.cluster == (16, 1, 1)
    assert _plan(PERSISTENT, persistent_args(logits, [163840] * 4, 2048, poison=None))[0].config == long.config


def test_decode_per_row_flag(fake_gpu):
    fake_gpu("H200")
    logits = torch.randn(4, 100)
    assert _plan(DECODE, decode_args(logits, 2, [[50, 60], [70, 80]], 8))[0].values["per_row"] == 1
    assert _plan(DECODE, decode_args(logits, 2, [50, 60], 8))[0].values["per_row"] == 0
    assert _plan(DECODE, decode_args(logits, 2, [[50], [60]], 8))[0].values["per_row"] == 0


def test_prefill_rows_run_last_first_only_when_ctas_wait(fake_gpu):
    """REVERSE_PREFILL_ROWS: a prefill grid larger than the SMs (132) runs its rows last-first; one that fits, and
    decode, keep launch order."""
    fake_gpu("H200")

    def reverse(op, rows):
        logits = torch.randn(rows, 1000)
        args = (prefill_args(logits, [0] * rows, [1000] * rows, 64, poison=None) if op is PREFILL
                else decode_args(logits, 1, [1000] * rows, 64, poison=None))
        (launch,) = _plan(op, args)
        return launch.config.grid[0] > 132, launch.values["reverse"]

    assert reverse(PREFILL, 300) == (True, 1)
    assert reverse(PREFILL, 100) == (False, 0)
    assert reverse(DECODE, 300) == (True, 0)


def test_no_rows_no_launch(fake_gpu):
    fake_gpu("H200")
    assert _plan(PREFILL, prefill_args(torch.randn(0, 10), [], [], 4, poison=None)) == []


@pytest.mark.parametrize("op", [PREFILL, PERSISTENT], ids=lambda op: op.name)
def test_k_past_a_small_gpu_s_shared_memory_names_the_op_and_argument(monkeypatch, op):
    """GPUs with 99 KB of shared memory a block (sm_86 / sm_89, not in GPUS) stream long rows up to k = 2528: past
    that the op rejects its k argument by name before any launch (narrow rows, whole in the buffer, take any k)."""
    values = {"sm_count": 84, "max_shared_memory_per_block_optin": 101376, "max_shared_memory_per_sm": 102400}
    monkeypatch.setattr(launcher, "device_attribute", lambda device, attr: values[attr])
    monkeypatch.setattr(launcher, "device_arch", lambda device: 86)

    def args(width, k):
        logits = torch.randn(2, width)
        widths = [width] * 2
        return prefill_args(logits, [0, 0], widths, k) if op is PREFILL else persistent_args(logits, widths, k)

    for k, width in ((2528, 40000), (4096, 8000)):
        call, _ = op.validate(args(width, k))
        assert op.plan(call)
    call, _ = op.validate(args(40000, 2529))
    k_name = "topK" if op is PREFILL else "k"
    with pytest.raises(ValueError, match=rf"^{op.name}: {k_name} = 2529 needs more shared memory per block than "
                                         r"the 101376 bytes this GPU allows for rows 40000 wide"):
        op.plan(call)

