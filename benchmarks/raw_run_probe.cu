// The raw indexer gather by page runs (issue 15; benchmarks/raw_run_probe.py):
// cp_gather_indexer_k_quant_cache's rows are a request's consecutive positions,
// so RUN of them inside one page are RUN contiguous 128-byte data rows and RUN
// contiguous 4-byte scale rows of the cache, going to RUN contiguous rows of
// dst_k and of dst_scale. A CTA takes a run with one block-table lookup and moves
// it whole, where the shipped ring moves 128-byte rows a lane group at a time
// (BENCHMARKS.md, log 28). Three ways to move a run:
//   MODE 0: bulk copies in (cp.async.bulk, one mbarrier), bulk copy out
//           (cp.async.bulk global <- shared), scale rows stored by threads
//   MODE 1: bulk copies in, every thread stores 16-byte pieces out
//   MODE 2: no shared memory: every thread loads and stores 16-byte pieces
// indexer_132 only (128 e4m3 values, one float32 scale a token, page-split),
// block_size a multiple of 4. Grid = (requests, Y): CTA (r, y) takes request
// r's runs y, y + Y, ...; PDL as kvgen's kernels.
#include <cstdint>

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int RUN, int THREADS, int MODE>
__device__ __forceinline__ void body(uint8_t* __restrict__ dst_k, uint32_t* __restrict__ dst_scale,
                                     const uint8_t* __restrict__ k_cache, const int* __restrict__ block_table,
                                     const int* __restrict__ cu_seq_lens, int bt_stride, long long page_stride,
                                     int block_size) {
  constexpr int DATA = 128, SCALE = 4, PIECES = DATA / 16;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* s_data = smem;                                   // RUN data rows
  uint8_t* s_scale = smem + RUN * DATA;                     // RUN + 4 scale rows (from a 16-byte boundary)
  uint64_t* bar = reinterpret_cast<uint64_t*>(s_scale + (RUN + 4) * SCALE);
  const int req = blockIdx.x;
  const int tid = threadIdx.x;
  if (MODE != 2 && tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  __syncthreads();
  asm volatile("griddepcontrol.launch_dependents;");
  const int first_row = cu_seq_lens[req];
  const int len = cu_seq_lens[req + 1] - first_row;
  const int runs = (len + RUN - 1) / RUN;
  const int* bt = block_table + (long long)req * bt_stride;
  uint32_t phase = 0;
  for (int j = blockIdx.y; j < runs; j += gridDim.y) {
    const int pos0 = j * RUN;
    const int n = min(RUN, len - pos0);
    const int page = bt[pos0 / block_size];
    const int r0 = pos0 % block_size;
    const uint8_t* base = k_cache + (long long)page * page_stride;
    const long long out_row = (long long)first_row + pos0;
    if (MODE == 2) {
      const uint4* src = reinterpret_cast<const uint4*>(base + (long long)r0 * DATA);
      uint4* dst = reinterpret_cast<uint4*>(dst_k + out_row * DATA);
      for (int i = tid; i < n * PIECES; i += THREADS) dst[i] = src[i];
      const uint32_t* ssrc = reinterpret_cast<const uint32_t*>(base + (long long)block_size * DATA) + r0;
      for (int i = tid; i < n; i += THREADS) dst_scale[out_row + i] = ssrc[i];
      continue;
    }
    // Scale rows from the 16-byte boundary at or before r0 (r0 is a multiple of
    // RUN, so of 4) to the one at or after r0 + n, inside the page (block_size % 4 == 0).
    const int sr1 = min((r0 + n + 3) & ~3, block_size);
    const uint32_t dbytes = n * DATA, sbytes = (sr1 - r0) * SCALE;
    const uint32_t b = smem_u32(bar);
    if (tid == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(dbytes + sbytes) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(smem_u32(s_data)), "l"(base + (long long)r0 * DATA), "r"(dbytes), "r"(b) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(smem_u32(s_scale)), "l"(base + (long long)block_size * DATA + r0 * SCALE), "r"(sbytes),
                   "r"(b) : "memory");
    }
    uint32_t done = 0;
    while (!done) {
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(b), "r"(phase) : "memory");
    }
    phase ^= 1;
    if (MODE == 0) {
      if (tid == 0) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     ::"l"(dst_k + out_row * DATA), "r"(smem_u32(s_data)), "r"(dbytes) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    } else {
      const uint4* src = reinterpret_cast<const uint4*>(s_data);
      uint4* dst = reinterpret_cast<uint4*>(dst_k + out_row * DATA);
      for (int i = tid; i < n * PIECES; i += THREADS) dst[i] = src[i];
    }
    // dst_scale rows are 4 bytes: not on 16-byte boundaries in general, so threads store them.
    for (int i = tid; i < n; i += THREADS) dst_scale[out_row + i] = reinterpret_cast<const uint32_t*>(s_scale)[i];
    if (MODE == 0 && tid == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    __syncthreads();  // the run's shared memory is read before the next run's copies land in it
  }
  if (MODE == 0 && tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

#define INST(R, T, M)                                                                                              \
  extern "C" __global__ void __launch_bounds__(T) raw_run_r##R##_t##T##_m##M(                                   \
      uint8_t* dst_k, uint32_t* dst_scale, const uint8_t* k_cache, const int* block_table, const int* cu_seq_lens, \
      int bt_stride, long long page_stride, int block_size) {                                                    \
    body<R, T, M>(dst_k, dst_scale, k_cache, block_table, cu_seq_lens, bt_stride, page_stride, block_size);      \
  }

INST(64, 128, 0)
INST(64, 128, 1)
INST(64, 128, 2)
INST(32, 128, 0)
INST(32, 128, 1)
INST(32, 128, 2)
