// The page-run probe (issue 17; benchmarks/page_run_probe.py, BENCHMARKS.md log 30):
// a CTA takes RUN consecutive tokens of one page, one block-table lookup, one
// cp.async.bulk of the contiguous data rows and one of the scale rows into shared
// memory behind an mbarrier, then converts and stores contiguous output rows.
// DSv4 584 only (576-B data rows, 8-B scale rows), whole sequences, no window:
// written in CUDA C to find the design before the template grew its page_run
// schedule. CS=1 stores with st.global.cs; STAGES>1 pipelines runs a CTA.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int RUN, int THREADS, int STAGES, int CS>
__device__ __forceinline__ void body(uint4* __restrict__ out, const uint8_t* __restrict__ k_cache,
                                     const int* __restrict__ seq_lens, const int* __restrict__ block_table,
                                     int bt_stride, long long page_stride, long long out_stride_req,
                                     int max_rows, int block_size, int runs_per_cta) {
  constexpr int DATA = 576, SCALE = 8;
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int STAGE = RUN * DATA + ((RUN * SCALE + 15) / 16) * 16 + 16;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + STAGES * STAGE);
  const int req = blockIdx.x;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bars[s])));
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  __syncthreads();
  const int seq_len = seq_lens[req];
  const int rows = min(seq_len, max_rows);
  const int total_runs = (rows + RUN - 1) / RUN;
  const int first_run = blockIdx.y * runs_per_cta;
  const int last_run = min(first_run + runs_per_cta, total_runs);
  const int* bt = block_table + (long long)req * bt_stride;
  // issue the copy of run j into stage s (thread 0)
  auto issue = [&](int j, int s) {
    int pos0 = j * RUN;
    int n = min(RUN, rows - pos0);
    int page = bt[pos0 / block_size];
    int r0 = pos0 % block_size;
    const uint8_t* base = k_cache + (long long)page * page_stride;
    uint8_t* st = smem + s * STAGE;
    int sr0 = r0 & ~1, sr1 = (r0 + n + 1) & ~1;
    uint32_t dbytes = n * DATA, sbytes = (sr1 - sr0) * SCALE;
    uint32_t bar = smem_u32(&bars[s]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(dbytes + sbytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(st)), "l"(base + (long long)r0 * DATA), "r"(dbytes), "r"(bar) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(st + RUN * DATA)), "l"(base + (long long)block_size * DATA + sr0 * SCALE),
                 "r"(sbytes), "r"(bar) : "memory");
  };
  if (tid == 0) {
    for (int s = 0; s < STAGES && first_run + s < last_run; ++s) issue(first_run + s, s);
  }
  asm volatile("griddepcontrol.launch_dependents;");
  int s = 0;
  uint32_t phase = 0;
  for (int j = first_run; j < last_run; ++j) {
    uint32_t bar = smem_u32(&bars[s]);
    uint32_t done = 0;
    while (!done) {
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(bar), "r"(phase) : "memory");
    }
    const int pos0 = j * RUN;
    const int n = min(RUN, rows - pos0);
    const int r0 = pos0 % block_size;
    const uint8_t* st = smem + s * STAGE;
    const uint8_t* sc = st + RUN * DATA + (r0 & 1) * SCALE;
    uint4* orow = out + req * (out_stride_req / 8) + (long long)pos0 * 64;
    for (int i = tid; i < n * 64; i += THREADS) {
      int t = i >> 6, c = i & 63;
      uint4 v;
      if (c < 56) {
        uint2 w = *reinterpret_cast<const uint2*>(st + t * DATA + c * 8);
        uint32_t code = sc[t * SCALE + (c >> 3)];
        float scale = __uint_as_float(code << 23);
        uint32_t words[2] = {w.x, w.y};
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(words[k >> 1] >> ((k & 1) * 16)), __NV_E4M3);
          float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
          __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
          o[k] = *reinterpret_cast<uint32_t*>(&b);
        }
        v = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
        v = *reinterpret_cast<const uint4*>(st + t * DATA + 448 + (c - 56) * 16);
      }
      if (CS) asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(orow + i), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
      else orow[i] = v;
    }
    __syncthreads();  // every thread has read stage s
    if (tid == 0 && j + STAGES < last_run) issue(j + STAGES, s);
    if (++s == STAGES) { s = 0; phase ^= 1; }
  }
}

#define INST(R, T, S, CS) \
  extern "C" __global__ void __launch_bounds__(T) page_r##R##_t##T##_s##S##_c##CS( \
      uint4* out, const uint8_t* k_cache, const int* seq_lens, const int* block_table, int bt_stride, \
      long long page_stride, long long out_stride_req, int max_rows, int block_size, int runs_per_cta) { \
    body<R, T, S, CS>(out, k_cache, seq_lens, block_table, bt_stride, page_stride, out_stride_req, max_rows, \
                  block_size, runs_per_cta); \
  }

INST(64, 256, 1, 0)
INST(32, 256, 1, 0)
INST(16, 128, 1, 0)
