"""selective_scan_fwd's pure-torch reference (also its CPU kernel), the functional `selective_scan_fn` built on the
op, and `random_call`, the random valid calls that the self-check, the tests and the benchmarks share.

The reference is sequential over tokens and vectorised over sequences of equal length (batched mode), channels
and states; its state-cache rules are the kernel's, written out per sequence in Python from the metadata.
"""

from __future__ import annotations

import random

import torch

__all__ = ["random_call", "selective_scan_fn", "selective_scan_fwd_ref"]


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 20, torch.log1p(torch.exp(x)), x)


def _trunc_div(a: int, b: int) -> int:
    """C's integer division (towards zero), as the kernel computes block columns."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _tolist(t):
    return None if t is None else t.tolist()


def _jobs(b, L, varlen, n_slots, null, block_size, qsl, ci, his, bif, bil, isi, cu, lci):
    """Per non-padding, non-empty sequence: (s, start, end, initial slot or None, final slot or None,
    {position in the sequence: slot} of the prefix-cache chunk states)."""
    if ci is None:
        null = -1  # no cache_indices: sequence s uses slot s, whatever null_block_id is (the spec's padding rule)

    def ok(slot):
        return 0 <= slot < n_slots and slot != null

    jobs = []
    for s in range(b):
        # (query_start_loc past [0, L] breaks the caller's contract: clamped, so no index leaves the tensors)
        start, end = (min(max(qsl[s], 0), L), min(max(qsl[s + 1], 0), L)) if varlen else (0, L)
        if end <= start:
            continue  # an empty sequence: nothing read or written
        init = bool(his[s]) if his is not None else False
        stores = {}
        if bif is None:
            slot = ci[s] if ci is not None else s
            if ci is not None and slot == null:
                continue
            jobs.append((s, start, end, slot if init and ok(slot) else None, slot if ok(slot) else None, stores))
            continue
        row = ci[s]
        slot0 = row[isi[s]] if 0 <= isi[s] < len(row) else None
        if slot0 is not None and slot0 == null:
            continue
        fin = row[bil[s]] if 0 <= bil[s] < len(row) and ok(row[bil[s]]) else None
        pos0, length = bif[s] * block_size, end - start
        if cu is None:
            ends = range(block_size, length, block_size)
        else:
            first, last = (0 if s == 0 else lci[s - 1] + 1), lci[s]
            ends = []
            if 0 <= first <= last and last + 1 < len(cu):
                first_tokens = cu[first + 1] - cu[first]
                if last > first and first_tokens < block_size:
                    pos0 += block_size - first_tokens  # a partial first chunk fills a started block
                ends = [cu[j + 1] - cu[first] for j in range(first, last)]
        for e in ends:
            col = _trunc_div(pos0 + e - 1, block_size)
            if 0 <= e - 1 < length - 1 and 0 <= col < len(row) and ok(row[col]):
                stores[e - 1] = row[col]
        jobs.append((s, start, end, slot0 if init and slot0 is not None and ok(slot0) else None, fin, stores))
    return jobs


def selective_scan_fwd_ref(u, delta, A, B, C, D_=None, z_=None, delta_bias_=None, delta_softplus=False,
                           query_start_loc=None, cache_indices=None, has_initial_state=None, ssm_states=None,
                           null_block_id=-1, block_size=0, block_idx_first_scheduled_token=None,
                           block_idx_last_scheduled_token=None, initial_state_idx=None, cu_chunk_seqlen=None,
                           last_chunk_indices=None, *, compute_dtype: torch.dtype = torch.float32):
    """The op's arguments, functional: returns (None, new delta = y, None, None, None, new z = y silu(z) or None,
    new ssm_states), one entry per written argument (u, A, B, C are never written). Shapes as the op's: u,
    delta, z [b, d, L] or [d, T]; B, C [b, g, n, L] or [g, n, T]; ssm_states [slots, d, n]. Math in
    `compute_dtype` (float64 for the gold standard), rounded to each output's dtype; initial states come from
    the ssm_states given, intermediate and final ones are written in token order."""
    cd, varlen, dev = compute_dtype, query_start_loc is not None, u.device
    d, n = A.shape
    g = B.shape[-3]
    grp = torch.arange(d, device=dev) // (d // g)
    y_new, st_new = delta.clone(), ssm_states.clone()
    z_new = None if z_ is None else z_.clone()
    A_ = A.to(cd)
    D = torch.zeros(d, dtype=cd, device=dev) if D_ is None else D_.to(cd)
    bias = torch.zeros(d, dtype=cd, device=dev) if delta_bias_ is None else delta_bias_.to(cd)
    qsl = _tolist(query_start_loc)
    b = len(qsl) - 1 if varlen else u.shape[0]
    L = u.shape[-1]
    jobs = _jobs(b, L, varlen, ssm_states.shape[0], null_block_id, block_size, qsl, _tolist(cache_indices),
                 _tolist(has_initial_state), _tolist(block_idx_first_scheduled_token),
                 _tolist(block_idx_last_scheduled_token), _tolist(initial_state_idx), _tolist(cu_chunk_seqlen),
                 _tolist(last_chunk_indices))
    # Batched sequences all span [0, L): one scan over all of them; varlen sequences one scan each.
    groups = [jobs] if not varlen else [[job] for job in jobs]
    for group in groups:
        if not group:
            continue
        seqs = [job[0] for job in group]
        start, end = group[0][1], group[0][2]
        if varlen:
            uu, dd = u[None, :, start:end], delta[None, :, start:end]
            BB, CC = B[None, ..., start:end], C[None, ..., start:end]
            zz = None if z_ is None else z_[None, :, start:end]
        else:
            uu, dd, BB, CC = u[seqs], delta[seqs], B[seqs], C[seqs]
            zz = None if z_ is None else z_[seqs]
        uu, BB, CC = uu.to(cd), BB.to(cd), CC.to(cd)
        dt = dd.to(cd) + bias[:, None]
        if delta_softplus:
            dt = _softplus(dt)
        h = torch.zeros(len(group), d, n, dtype=cd, device=dev)
        for j, job in enumerate(group):
            if job[3] is not None:
                h[j] = ssm_states[job[3]].to(cd)
        ys = []
        for t in range(end - start):
            dt_t, u_t = dt[..., t], uu[..., t]
            h = torch.exp(dt_t[..., None] * A_) * h + (dt_t * u_t)[..., None] * BB[..., t][:, grp]
            ys.append((h * CC[..., t][:, grp]).sum(-1) + D * u_t)
            for j, job in enumerate(group):
                if t in job[5]:
                    st_new[job[5][t]] = h[j].to(st_new.dtype)
        y = torch.stack(ys, -1)
        gated = None if zz is None else y * (zz.to(cd) / (1 + torch.exp(-zz.to(cd))))
        for j, job in enumerate(group):
            where = (slice(None), slice(start, end)) if varlen else (job[0],)
            y_new[where] = y[j].to(y_new.dtype)
            if gated is not None:
                z_new[where] = gated[j].to(z_new.dtype)
            if job[4] is not None:
                st_new[job[4]] = h[j].to(st_new.dtype)
    return None, y_new, None, None, None, z_new, st_new


def _private(tensors: list) -> list:
    """Copies of the tensors that share memory with an earlier one: the op's schema marks u, A, B and C as
    written, so they may not overlap any other argument (views of one projection often do)."""
    if torch.compiler.is_compiling():
        # A storage's address cannot be traced: copy every one but the first (the small A, B, C, D, ...). Left
        # shared, B and C as one tensor gave a compiled graph a wrong out (the functionalized op's copies of two
        # aliased written arguments; torch 2.11, CPU).
        return [tensors[0], *(None if t is None else t.clone() for t in tensors[1:])]
    seen, out = set(), []
    for t in tensors:
        if t is not None:
            key = t.untyped_storage().data_ptr()
            if key in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, query_start_loc=None, initial_state=None,
                      state_dtype=torch.float32):
    """mamba_ssm's functional selective scan on selective_scan_fwd's kernel; the inputs are left as they are.

    u, delta, z: [b, d, L] (or [d, T] with query_start_loc [b + 1] int32); A: [d, n] float32; B, C: [b, n, L] or
    [b, g, n, L] (varlen: [n, T] or [g, n, T]); D, delta_bias: [d] float32; initial_state: [b, d, n] or None.
    Returns out [b, d, L] in u's dtype (y * silu(z) when z is given, else y), and with return_last_state also
    the final states [b, d, n] in `state_dtype`."""
    from .selective_scan_fwd import selective_scan_fwd

    varlen = query_start_loc is not None
    # The kernel reads rows of unit stride (as mamba_ssm, which makes these contiguous where that stride is not 1).
    u, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, B, C))
    if B.dim() == (2 if varlen else 3):
        B = B.unsqueeze(-3)  # one group
    if C.dim() == (2 if varlen else 3):
        C = C.unsqueeze(-3)
    b = query_start_loc.shape[0] - 1 if varlen else u.shape[0]
    d, n = A.shape
    y = torch.empty_like(delta, memory_format=torch.contiguous_format).copy_(delta)
    zbuf = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format).copy_(z)
    if initial_state is None:
        states = torch.zeros(b, d, n, dtype=state_dtype, device=u.device)
    else:
        states = initial_state.to(state_dtype, copy=True)
    has_init = torch.full((b,), initial_state is not None, dtype=torch.bool, device=u.device)
    u, A, B, C, D, delta_bias, query_start_loc = _private([u, A, B, C, D, delta_bias, query_start_loc])
    selective_scan_fwd(u, y, A, B, C, D, zbuf, delta_bias, delta_softplus, query_start_loc, None, has_init,
                       states, -1, 0, None, None, None, None, None)
    out = y if z is None else zbuf
    return (out, states) if return_last_state else out


def random_call(device, dtype=torch.bfloat16, *, b=None, d=16, n=8, L=None, lengths=None, g=1, pad=None,
                init=0.5, z=True, D=True, bias=True, softplus=True, state_dtype=None, null=-1, block_size=16,
                cache=False, cu_chunks=False, max_chunk=None, cache_indices=True, a_scale=1.0, seed=0) -> tuple:
    """Positional arguments of one valid call with random values. Batched ([b, d, L]) when `lengths` is None, else
    varlen with those sequence lengths. `pad`: index of a padding sequence (its slot is `null`); `init`: the
    fraction of sequences with an initial state. Prefix-cache mode when `cache`: each sequence resumes after a
    random number of computed tokens (block-aligned unless `cu_chunks`, which also passes cu_chunk_seqlen and
    last_chunk_indices as vLLM's scheduler builds them; `max_chunk`: chunks of at most that many tokens, several
    to a block, which vLLM's scheduler does not build but the op takes). A = -exp(N(0, 1) / 2) * a_scale."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(device)

    varlen = lengths is not None
    b = len(lengths) if varlen else b
    tokens = sum(lengths) if varlen else L
    tok_shape = (d, tokens) if varlen else (b, d, L)
    bc_shape = (g, n, tokens) if varlen else (b, g, n, L)
    u = randn(*tok_shape)
    # dt must stay positive without softplus (exp(dt A) > 1 would blow the scan up): delta in [0, 0.5) then
    delta = (randn(*tok_shape, scale=0.5) if softplus else
             (torch.rand(*tok_shape, generator=gen) / 2).to(dtype).to(device))
    A = -torch.exp(torch.randn(d, n, generator=gen) / 2).to(device) * a_scale
    Bm, Cm = randn(*bc_shape), randn(*bc_shape)
    Dv = randn(d, dt=torch.float32) if D else None
    zt = randn(*tok_shape) if z else None
    bias_t = (torch.rand(d, generator=gen) - (1.0 if softplus else 0.0)).to(device) if bias else None
    qsl = None
    if varlen:
        qsl = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(b)], dtype=torch.int32, device=device)
    has_init = torch.tensor([rng.random() < init for _ in range(b)], dtype=torch.bool, device=device)
    state_dtype = state_dtype or dtype
    first = 1 if null == 0 else 0  # slot 0 is the null block when null_block_id = 0
    extra = None
    if not cache:
        slots = first + b + 2
        perm = list(range(first, slots))
        rng.shuffle(perm)
        ci = perm[:b]
        if pad is not None:
            ci[pad] = null
        ci_t = torch.tensor(ci, dtype=torch.int32, device=device) if cache_indices else None
        if not cache_indices:
            slots = b + 1
    else:
        ctx, rows, chunks, lci = [], [], [0], []
        lens = lengths if varlen else [L] * b
        for s in range(b):
            done = rng.randrange(0, 3 * block_size)
            done = done if cu_chunks else done - done % block_size
            ctx.append(done)
        max_blocks = max((c + ln + block_size - 1) // block_size for c, ln in zip(ctx, lens)) + 1
        slots = first + b * max_blocks + 1
        pool = list(range(first, slots))
        rng.shuffle(pool)
        for s in range(b):
            rows.append([pool.pop() for _ in range(max_blocks)])
            pos, left = ctx[s], lens[s]
            while left > 0:  # vLLM's chunks: the rest of a started block, then whole blocks
                take = min(left, block_size - pos % block_size, max_chunk or left)
                chunks.append(chunks[-1] + take)
                pos, left = pos + take, left - take
            lci.append(len(chunks) - 2)
        bif = [c // block_size for c in ctx]
        bil = [(c + ln - 1) // block_size if ln else c // block_size for c, ln in zip(ctx, lens)]
        isi = [max(c - 1, 0) // block_size for c in ctx]
        has_init = torch.tensor([c > 0 and rng.random() < max(init, 0.5) for c in ctx], dtype=torch.bool,
                                device=device)
        if pad is not None:
            rows[pad][isi[pad]] = null
        ci_t = torch.tensor(rows, dtype=torch.int32, device=device)
        as_t = [torch.tensor(x, dtype=torch.int32, device=device) for x in (bif, bil, isi)]
        cu_t = torch.tensor(chunks, dtype=torch.int32, device=device) if cu_chunks else None
        lci_t = torch.tensor(lci, dtype=torch.int32, device=device) if cu_chunks else None
        extra = (*as_t, cu_t, lci_t)
    states = randn(slots, d, n, dt=state_dtype)
    tail = extra or (None, None, None, None, None)
    return (u, delta, A, Bm, Cm, Dv, zt, bias_t, softplus, qsl, ci_t, has_init, states, null,
            block_size if cache else 0, *tail)
