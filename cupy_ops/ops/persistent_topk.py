"""persistent_topk: per row, the indices of the k largest of the first L scores, L = clamp(length, 0,
min(max_seq_len, W)). Spec: ../shared/specs/persistent_topk.md.

    output[r, :] = the k columns of logits[r, :L_r] with the largest values, in ascending order;
                   when L_r <= k: 0, 1, ..., L_r - 1, then -1.

Same schema as vLLM 0.33 (`torch.ops._C.persistent_topk`), CUDA-graph safe in the same way (the launch depends
only on rows, the row pitch, k and max_seq_len; each row's length is read on the device), and beyond it:
- deterministic: values are ranked by an order-preserving key in which -0 == +0 and every NaN ranks above +inf
  (torch.topk's order), ties at the k-th value go to the lowest column, and the chosen columns are listed in
  ascending order: the same bits on every run and GPU, equal to `persistent_topk_ref`;
- any k in 1..4096 (vLLM: 512, 1024, 2048; GPUs with 99 KB of shared memory a block, sm_86 / sm_89: up to 2528
  for rows wider than ~8K scores in calls of many rows, else a ValueError naming k), any row pitch
  (logits.stride(0), even odd), any output row stride;
- nothing at or past L is read; lengths < 0 give empty rows, lengths > min(max_seq_len, W) are clamped;
- no workspace: this implementation never reads or writes it (`workspace_bytes` is 0), so the schema's
  `Tensor workspace` (not `Tensor!`) is exact. It must still be a uint8 tensor on the logits' device (vLLM callers
  pass their 1 MiB buffer); `persistent_topk_workspace` makes a valid one.
- CTAs that cooperate on a row form one thread-block cluster (sm_90), whose co-residency the hardware guarantees:
  there is no spin barrier in global memory, so the op cannot hang however busy the GPU is. On older GPUs each
  row is one CTA.
The device code is common/topk.cuh, topk_row.cuh, topk_two_pass.cuh and topk_registers.cuh, shared with
top_k_per_row_prefill/decode, as are the row plans and the reference select (ops/topk_rows.py).
"""

from __future__ import annotations

import torch

from .._runtime import Call, Launch, Op, TensorArg
from .._runtime import params as P
from .topk_rows import NoRowPlan, check_k_and_width, check_lengths, plan_rows, row_kernels, select_rows_ref

KERNELS = row_kernels("persistent_topk.cu", "persistent_topk_kernel")
PARAMS = P.CStruct("PersistentTopKParams", [
    P.ptr("output"), P.ptr("logits"), P.ptr("lengths"),
    P.i64("stride0"), P.i64("out_stride"), P.i64("max_len"),
    P.i32("k"), P.i32("cap"), P.i32("stage"), P.i32("stages"), P.i32("sample"), P.f32("sample_spread"),
    P.i32("sample_floor"),
])


def workspace_bytes(rows: int, width: int, k: int) -> int:
    """Bytes of `workspace` a call with these sizes needs: none (the cooperating CTAs of a row share a cluster's
    distributed shared memory, not global memory)."""
    return 0


def persistent_topk_workspace(rows: int, width: int, k: int, device="cuda") -> torch.Tensor:
    """A workspace for persistent_topk calls of these sizes: uint8 [workspace_bytes(rows, width, k)] on `device`."""
    return torch.empty(workspace_bytes(rows, width, k), dtype=torch.uint8, device=device)


def max_length(max_seq_len: int, width: int) -> int:
    """The longest row a call can have: min(max_seq_len, W), at least 0."""
    return max(0, min(max_seq_len, width))


def check(c: Call) -> None:
    rows, width = c.dims["rows"], c.dims["width"]
    check_k_and_width(c, "k", "output", width)
    if c.lengths.numel != rows:
        c.reject("lengths", f"has {c.lengths.numel} elements; expected one per row ({rows})")
    check_lengths(c, "lengths", rows, dims=(1, 2))
    need = workspace_bytes(rows, width, c.k)
    if c.workspace.numel * c.workspace.itemsize < need:
        c.reject("workspace", f"is too small: {c.workspace.numel} bytes, this call needs {need} "
                              "(persistent_topk_workspace allocates one)")


def plan(c: Call) -> list:
    rows = c.dims["rows"]
    if rows == 0:
        return []
    max_len = max_length(c.max_seq_len, c.dims["width"])
    try:
        kernel, config, row = plan_rows(KERNELS, c.device, rows, max_len, c.k)
    except NoRowPlan as exc:
        c.reject("k", str(exc))
    return [Launch(kernel, config, PARAMS,
                   {"stride0": c.logits.strides[0], "out_stride": c.output.strides[0], "max_len": max_len, "k": c.k,
                    "cap": row.cap, "stage": row.stage, "stages": row.stages,
                    "sample": row.sample, "sample_spread": row.sample_spread, "sample_floor": row.sample_floor})]


def persistent_topk_ref(logits, lengths, output, workspace, k, max_seq_len, *, compute_dtype=torch.float32):
    """(new output [rows, k] int32,): the op's result (exact; compute_dtype is unused). The workspace is unused."""
    limit = max_length(max_seq_len, logits.shape[1])
    length = lengths.reshape(-1).to(torch.int64).clamp(0, limit)
    return (select_rows_ref(logits, torch.zeros_like(length), length, k),)


def examples(device: str) -> list[tuple[str, tuple]]:
    """DeepSeek-style decode batches: 4 rows of up to 163840 (cluster rows), 64 rows of up to 20000; k 2048, 512;
    a padded row pitch and NaN past each length."""
    gen = torch.Generator(device=device).manual_seed(2)
    cases = []
    for rows, width, k in ((4, 163840, 2048), (64, 20000, 512)):
        logits = torch.randn(rows, width + 256, generator=gen, device=device)[:, :width]
        lengths = torch.randint(width // 2, width + 1, (rows,), generator=gen, device=device, dtype=torch.int32)
        logits.masked_fill_(torch.arange(width, device=device) >= lengths[:, None], float("nan"))
        output = torch.empty(rows, k, dtype=torch.int32, device=device)
        cases.append((f"{rows}x{width} k{k} padded pitch", (logits, lengths, output,
                                                             persistent_topk_workspace(rows, width, k, device), k,
                                                             width)))
    return cases


OP = Op(
    "persistent_topk(Tensor logits, Tensor lengths, Tensor! output, Tensor workspace, int k, int max_seq_len) -> ()",
    tensors=[TensorArg("logits", "in", ("rows", "width"), (torch.float32,), unit_last_stride=True),
             TensorArg("lengths", "in", None, (torch.int32,)),
             TensorArg("output", "out", ("rows", "k"), (torch.int32,), unit_last_stride=True),
             TensorArg("workspace", "in", None, (torch.uint8,))],
    kernels=KERNELS.all(), params=PARAMS, check=check, plan=plan,
    reference=persistent_topk_ref, examples=examples, doc=__doc__)
persistent_topk = OP.public
