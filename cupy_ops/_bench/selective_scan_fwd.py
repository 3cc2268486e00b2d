"""Benchmark suite of selective_scan_fwd: the issue's shapes (bf16 with z, D, delta_bias, softplus), each case with
its bytes moved and its two floors on an H200: bytes at the measured copy bandwidth, and exps at the MUFU rate.

Floors (`ScanCase.floors_us`), for the H200 the issue quotes (132 SMs, 1.98 GHz boost, copy 4250 GB/s):
- bytes: u, delta, z read and y, y silu(z) written once per (token, channel), B and C read once per (token,
  group), states read (initial) and written once: bytes_moved / 4250 GB/s.
- exps: one MUFU op per (token, channel, state) for exp(dt A), plus 4 per (token, channel) (softplus' exp and
  log, silu's exp and reciprocal); the H200 retires 16 MUFU ops per SM per clock: 132 * 16 * 1.98e9 per second.
The kernel is bounded by the larger (the exp floor for every case here, by 1.5-8x).
"""

from __future__ import annotations

import dataclasses
import random

import torch

import cupy_ops
from cupy_ops.ops.selective_scan_fwd import OP
from cupy_ops.ops.selective_scan_ref import random_call

from .harness import OpSuite, eager_calls_for, first_call_probe

H200_COPY_GBPS, H200_MUFU_PER_S = 4250.0, 132 * 16 * 1.98e9
MUFU_PER_TOKEN_CHANNEL = 4  # softplus exp + log, silu exp + reciprocal
# vLLM's kernel on the H200 for the same shapes (the numbers, µs), for the record beside ours.
VLLM_H200_US = {"b1-d4096-n16-L128": 25.1, "b1-d4096-n16-L2048": 237.0, "b1-d4096-n16-L8192": 908.0,
                "b8-d4096-n16-L2048": 1826.4, "b1-d4096-n128-L2048": 1448.1, "varlen64-d4096-n16-T16384": 23518.0}


@dataclasses.dataclass(frozen=True)
class ScanCase:
    """Batched [b, d, L] (lengths None) or varlen with `lengths`; bf16 inputs and states, one group."""

    b: int
    d: int
    n: int
    L: int = 0
    lengths: tuple | None = None
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return sum(self.lengths) if self.lengths else self.b * self.L

    @property
    def name(self) -> str:
        if self.lengths:
            return f"varlen{len(self.lengths)}-d{self.d}-n{self.n}-T{self.tokens}"
        return f"b{self.b}-d{self.d}-n{self.n}-L{self.L}"

    @property
    def shape(self) -> tuple:
        return (len(self.lengths) if self.lengths else self.b, self.d, self.n, self.tokens)

    @property
    def dtype_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    @property
    def input_bytes(self) -> int:
        """u, delta, z per (token, channel); B, C per token; states of every sequence; A, D, delta_bias."""
        e = self.dtype.itemsize
        seqs = self.shape[0]
        return (3 * self.tokens * self.d + 2 * self.tokens * self.n) * e + seqs * self.d * self.n * e + 6 * self.d * 4 \
            + self.d * self.n * 4

    @property
    def bytes_moved(self) -> int:
        """Inputs read once, y and y silu(z) written once, every final state written once."""
        e = self.dtype.itemsize
        return self.input_bytes + 2 * self.tokens * self.d * e + self.shape[0] * self.d * self.n * e

    @property
    def floors_us(self) -> dict:
        """{"bytes": µs at the H200's copy bandwidth, "exp": µs at its MUFU rate, "vllm_h200": the issue's µs}."""
        exps = self.tokens * self.d * (self.n + MUFU_PER_TOKEN_CHANNEL)
        return {"bytes": self.bytes_moved / (H200_COPY_GBPS * 1e3), "exp": exps / H200_MUFU_PER_S * 1e6,
                "vllm_h200": VLLM_H200_US.get(self.name)}

    def __str__(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def varlen_lengths(count: int = 64, total: int = 16384, seed: int = 0) -> tuple:
    """`count` random lengths >= 1 summing to `total` (a uniform random composition)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), count - 1))
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, total]))


def cases(quick: bool = False) -> list[ScanCase]:
    if quick:
        return [ScanCase(1, 4096, 16, 128), ScanCase(1, 4096, 16, 2048),
                ScanCase(0, 4096, 16, lengths=varlen_lengths())]
    return [ScanCase(1, 4096, 16, 128), ScanCase(1, 4096, 16, 2048), ScanCase(1, 4096, 16, 8192),
            ScanCase(8, 4096, 16, 2048), ScanCase(1, 4096, 128, 2048), ScanCase(0, 4096, 16, lengths=varlen_lengths())]


def make_inputs(case: ScanCase, seed: int = 0) -> tuple:
    """The op's positional arguments: z, D, delta_bias, softplus; varlen with cache_indices and every sequence's
    initial state (as the issue's varlen case), batched with half of them."""
    if case.lengths:
        return random_call("cuda", case.dtype, d=case.d, n=case.n, lengths=list(case.lengths), init=1.0, seed=seed)
    return random_call("cuda", case.dtype, b=case.b, d=case.d, n=case.n, L=case.L, seed=seed)


def _combine(x, y):  # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return x[0] * y[0], y[0] * x[1] + y[1]


def torch_scan_into(u, delta, A, B, C, D, z, delta_bias, softplus, qsl, ci, his, states, null, block_size, *rest):
    """The torch baseline (plain mode, every slot valid: the benchmark's inputs): one associative scan of
    (exp(dt A), dt B u) over the token axis, sequence starts as resets; float32; written in place like the op."""
    from torch._higher_order_ops.associative_scan import associative_scan

    varlen = qsl is not None
    d = A.shape[0]
    if varlen:
        u, delta, B, C = u[None], delta[None], B[None], C[None]
        z = None if z is None else z[None]
    grp = torch.arange(d, device=u.device) // (d // B.shape[1])
    dt = delta.float() + (0 if delta_bias is None else delta_bias[:, None])
    if softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    uf = u.float()
    dA = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    dBu = (dt * uf)[:, :, None, :] * B.float()[:, grp]
    h0 = states[ci].float() * his[:, None, None]
    if varlen:
        starts, ends = qsl[:-1].long(), qsl[1:].long() - 1
        dBu[0, :, :, starts] += dA[0, :, :, starts] * h0.permute(1, 2, 0)
        dA[0, :, :, starts] = dA.new_zeros(())  # a device scalar: a Python 0 is copied from the host (no graphs)
    else:
        dBu[..., 0] += dA[..., 0] * h0
        dA[..., 0] = 0
    mode = "pointwise" if dA.is_cuda else "generic"  # Triton's scan on the GPU
    _, h = associative_scan(_combine, (dA, dBu), dim=3, combine_mode=mode)
    y = (h * C.float()[:, grp]).sum(2) + (0 if D is None else D[:, None] * uf)
    if z is not None:
        zf = z.float()
        z.copy_(y * zf * torch.sigmoid(zf))
    delta.copy_(y)
    final = h[0, :, :, ends].permute(2, 0, 1) if varlen else h[..., -1]
    states[ci] = final.to(states.dtype)


def providers(case: ScanCase, vllm_ops=None) -> dict:
    found = {"cupy_ops": cupy_ops.selective_scan_fwd}
    if vllm_ops is not None and hasattr(vllm_ops, "selective_scan_fwd"):
        found["vllm"] = vllm_ops.selective_scan_fwd
    return found


def eager_calls(vllm_ops=None) -> dict:
    """Host cost per eager call on the small decode-like case (b4 d256 n16 L1, the short kernel)."""
    args = random_call("cuda", torch.bfloat16, b=4, d=256, n=16, L=1, seed=0)
    has_vllm = vllm_ops is not None and hasattr(vllm_ops, "selective_scan_fwd")
    return eager_calls_for(OP, args, vllm_ops.selective_scan_fwd if has_vllm else None)


_COMPILE_PROBE = first_call_probe(
    "selective_scan_fwd", "from cupy_ops.ops.selective_scan_ref import random_call\n"
                          "args = random_call('cuda', torch.bfloat16, b=4, d=256, n=16, L=300, seed=0)")


SUITE = OpSuite(
    op="selective_scan_fwd", cases=cases, make_inputs=make_inputs, providers=providers,
    reference_into=torch_scan_into, outputs=lambda args: (args[1], args[6], args[12]),
    gold=lambda args: tuple(OP.reference(*args, compute_dtype=torch.float64)[i] for i in (1, 5, 6)),
    output_dtypes=lambda case: (case.dtype, case.dtype, case.dtype),
    eager_calls=eager_calls, eager_providers=("cupy_ops", "cupy_ops_dispatcher", "vllm"),
    compile_probe=_COMPILE_PROBE, small_case="b4 d256 n16 L1 bf16",
)
