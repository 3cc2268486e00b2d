// selective_scan.cu's sequences, state slots and scratch addressing: which sequence a token belongs to, where its
// states are read and stored, and the chunked run's scratch. Included by selective_scan.cu after
// SelectiveScanParams and its constants (kNone, kSnap, ...), which it uses; not a standalone header.
#pragma once

namespace cupy_ops {

// ---- sequences and their state slots ----------------------------------------------------------------------

struct Seq {
  int64_t start, end;  // token range [start, end) in the row (varlen: indices in T)
  int64_t pos0;        // prefix-cache mode: block-grid position of token `start`
  int64_t row;         // s
  int slot0;           // slot of the initial state, or kNone (zeros)
  int fin;             // slot of the final state, or kNone (not stored)
  int cu_first;        // prefix-cache mode with cu_chunk_seqlen: the sequence's chunks, or cu_first > cu_last
  int cu_last;
  bool pad;            // padding, or tokens of no sequence: nothing read or written
};

// A slot we may read or write: inside ssm_states and not the null block (vLLM writes the null block; we never
// touch it, so null_block_id = -1 from older callers never indexes out of bounds).
__device__ __forceinline__ bool slot_ok(const SelectiveScanParams& p, int64_t slot) {
  return slot >= 0 && slot < p.num_slots && slot != p.null_block_id;
}

__device__ Seq seq_info(const SelectiveScanParams& p, int64_t s) {
  Seq q;
  q.row = s;
  q.start = p.varlen ? ld(p.query_start_loc, s, p.qsl_stride) : 0;
  q.end = p.varlen ? ld(p.query_start_loc, s + 1, p.qsl_stride) : p.seqlen;
  q.pos0 = 0;
  q.slot0 = q.fin = kNone;
  q.cu_first = 0, q.cu_last = -1;
  q.pad = false;
  const bool init = p.has_initial_state != nullptr &&
                    __ldg(reinterpret_cast<const unsigned char*>(p.has_initial_state) + s * p.his_stride) != 0;
  if (!p.cache_mode) {
    const int64_t slot = p.cache_indices != nullptr ? ld(p.cache_indices, s, p.ci_stride[0]) : s;
    q.pad = p.cache_indices != nullptr && slot == p.null_block_id;
    if (!q.pad && slot_ok(p, slot)) {
      q.fin = static_cast<int>(slot);
      if (init) q.slot0 = q.fin;
    }
    return q;
  }
  // Prefix-cache mode: the initial state's slot decides padding (as in vLLM); columns are bounds-checked.
  const int* row = p.cache_indices + s * p.ci_stride[0];
  const int64_t col0 = ld(p.initial_state_idx, s, p.isi_stride);
  if (col0 >= 0 && col0 < p.max_blocks) {
    const int64_t slot0 = ld(row, col0, p.ci_stride[1]);
    q.pad = slot0 == p.null_block_id;
    if (init && slot_ok(p, slot0)) q.slot0 = static_cast<int>(slot0);
  }
  if (q.pad) return q;
  const int64_t col = ld(p.block_idx_last, s, p.bil_stride);
  if (col >= 0 && col < p.max_blocks) {
    const int64_t slot = ld(row, col, p.ci_stride[1]);
    if (slot_ok(p, slot)) q.fin = static_cast<int>(slot);
  }
  q.pos0 = ld(p.block_idx_first, s, p.bif_stride) * p.block_size;
  if (p.cu_chunk_seqlen != nullptr) {
    const int64_t first = s == 0 ? 0 : ld(p.last_chunk_indices, s - 1, p.lci_stride) + 1;
    const int64_t last = ld(p.last_chunk_indices, s, p.lci_stride);
    if (first >= 0 && first <= last && last + 1 < p.cu_len) {
      q.cu_first = static_cast<int>(first), q.cu_last = static_cast<int>(last);
      // A partial first chunk fills the rest of an already started block.
      const int64_t first_tokens = ld(p.cu_chunk_seqlen, first + 1, p.cu_stride) -
                                   ld(p.cu_chunk_seqlen, first, p.cu_stride);
      if (last > first && first_tokens < p.block_size) q.pos0 += p.block_size - first_tokens;
    }
  }
  return q;
}

// The sequence holding token t: varlen binary search of query_start_loc (monotone: the caller's contract; if it
// is not, results are wrong but every access stays in bounds); tokens outside every sequence form padding.
__device__ Seq find_seq(const SelectiveScanParams& p, int64_t t, int64_t batched_row) {
  if (!p.varlen) return seq_info(p, batched_row);
  int64_t lo = 0, hi = p.batch + 1;  // first i with query_start_loc[i] > t
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (ld(p.query_start_loc, mid, p.qsl_stride) <= t) lo = mid + 1; else hi = mid;
  }
  if (lo >= 1 && lo <= p.batch) return seq_info(p, lo - 1);
  Seq q;
  q.start = lo == 0 ? 0 : ld(p.query_start_loc, p.batch, p.qsl_stride);
  q.end = lo == 0 ? ld(p.query_start_loc, 0, p.qsl_stride) : (int64_t(1) << 62);
  q.pad = true;
  q.row = 0, q.pos0 = 0, q.slot0 = q.fin = kNone, q.cu_first = 0, q.cu_last = -1;
  return q;
}

// Prefix-cache mode: the slot that gets the state after token `pos` of the sequence when a chunk other than
// the last ends there (block_size chunks, or cu_chunk_seqlen's), else kNone. A store that a later store of the
// sequence overwrites is not made (kNone): vLLM stores chunk by chunk in order, so the later state is what the slot
// holds, but here chunks of one sequence may be scanned by different CUDA blocks in any order. Later stores: the
// next chunk end in the same block column (cu_chunk_seqlen chunks shorter than block_size), and the final state
// (block_idx_last_scheduled_token's column, or the same slot). Different columns holding one slot (a block table
// that repeats a block) are the caller's error: such stores land in any order.
__device__ int store_point(const SelectiveScanParams& p, const Seq& q, int64_t pos) {
  const int64_t len = q.end - q.start;
  if (pos + 1 >= len) return kNone;  // the last token: the final state
  int64_t next = -1;  // the position of the sequence's next chunk end, if it is not the last token
  if (p.cu_chunk_seqlen == nullptr) {
    if ((pos + 1) % p.block_size != 0) return kNone;
  } else {
    const int64_t first = ld(p.cu_chunk_seqlen, q.cu_first, p.cu_stride), want = first + pos + 1;
    int64_t lo = int64_t(q.cu_first) + 1, hi = q.cu_last, found = -1;  // ends of chunks cu_first .. cu_last - 1
    while (lo <= hi && found < 0) {
      const int64_t mid = (lo + hi) >> 1, v = ld(p.cu_chunk_seqlen, mid, p.cu_stride);
      if (v == want) found = mid;
      else if (v < want) lo = mid + 1;
      else hi = mid - 1;
    }
    if (found < 0) return kNone;
    if (found < q.cu_last) next = ld(p.cu_chunk_seqlen, found + 1, p.cu_stride) - first - 1;
  }
  const int64_t col = (q.pos0 + pos) / p.block_size;
  if (col < 0 || col >= p.max_blocks) return kNone;
  if (next > pos && next + 1 < len && (q.pos0 + next) / p.block_size == col) return kNone;
  const int64_t slot = ld(p.cache_indices + q.row * p.ci_stride[0], col, p.ci_stride[1]);
  return slot_ok(p, slot) && slot != q.fin ? static_cast<int>(slot) : kNone;
}

// ---- states ------------------------------------------------------------------------------------------------

// Scratch of a chunked run (floats): carry [chunks][d][n] (pass 1: end state from zero; the carry kernel turns
// it into the state entering the chunk), snapshot [chunks][d][n] (initial state of the sequence that starts
// in the chunk and crosses its end), sum of dt [chunks][d], restart flag [chunks] (int bits).
__device__ __forceinline__ int64_t scratch_carry(const SelectiveScanParams& p, int64_t chunk, int64_t c) {
  return (chunk * p.dim + c) * p.dstate;
}
__device__ __forceinline__ int64_t scratch_snap(const SelectiveScanParams& p, int64_t chunk, int64_t c) {
  return (p.num_chunks + chunk) * p.dim * p.dstate + c * p.dstate;
}
__device__ __forceinline__ int64_t scratch_sdt(const SelectiveScanParams& p, int64_t chunk) {
  return 2 * p.num_chunks * p.dim * p.dstate + chunk * p.dim;
}
__device__ __forceinline__ int64_t scratch_flag(const SelectiveScanParams& p, int64_t chunk) {
  return 2 * p.num_chunks * p.dim * p.dstate + p.num_chunks * p.dim + chunk;
}

template <typename T>
__device__ __forceinline__ float load_state(const SelectiveScanParams& p, int slot, int64_t c, int64_t k,
                                            int64_t chunk) {
  if (slot == kSnap) return p.scratch[scratch_snap(p, chunk, c) + k];
  if (slot < 0) return 0.f;
  const int64_t off = slot * p.state_stride[0] + c * p.state_stride[1] + k * p.state_stride[2];
  return p.state_f32 ? static_cast<const float*>(p.ssm_states)[off]
                     : to_float(static_cast<const T*>(p.ssm_states)[off]);
}

template <typename T>
__device__ __forceinline__ void store_state(const SelectiveScanParams& p, int slot, int64_t c, int64_t k,
                                            float h) {
  const int64_t off = slot * p.state_stride[0] + c * p.state_stride[1] + k * p.state_stride[2];
  if (p.state_f32) static_cast<float*>(p.ssm_states)[off] = h;
  else static_cast<T*>(p.ssm_states)[off] = from_float<T>(h);
}

}  // namespace cupy_ops
