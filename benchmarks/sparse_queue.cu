// Probe (H100): does a sparse gather lose at 100% valid because a one-wave
// grid splits its work once (the slowest SM sets the time), and does a queue
// of chunks taken by atomic counter win it back? BENCHMARKS.md, log 51
// (results/sparse_queue_h100.txt, results/sparse_queue_stagger_h100.txt).
//
//   nvcc -O3 -arch=sm_90a -o /tmp/sparse_queue benchmarks/sparse_queue.cu && /tmp/sparse_queue
//
// DSv4's traffic without its decode: a record is a 576-byte data row and an
// 8-byte scale row of a 64-token page (584 bytes), an output row 1024 bytes;
// slots random over the cache, a fraction valid, the rest -1 (no load, no
// store). Every kernel moves the same bytes the same way (a warp a record, a
// lane two 16-byte output chunks, STAGES records a lane group in flight); they
// differ only in who takes which slots:
//   blocks:  a warp takes one block of STAGES consecutive slots, a grid of
//            N / (4 * STAGES) CTAs (kvgen's direct schedule);
//   chunks:  a warp takes one chunk of CHUNK slots (one load a lane, a ballot),
//            then its valid ones in rounds of STAGES; a grid of one chunk a warp
//            (log 50's direct_ballot);
//   queue:   the same chunks, taken from an atomic counter by a one-wave grid of
//            resident warps (the next chunk taken, and its slots loaded, before
//            the current one is moved); the last warp to finish zeroes the
//            counter for the next call.
//   cs / wt: the same with the output stored with the streaming (evict-first) or
//            write-through cache policy (BENCHMARKS.md, log 52).
// --once runs each kernel once at 100% valid, checked and not timed, for ncu
// (results/sparse_queue_ncu_h100.txt, results/sparse_queue_hints_h100.txt).
// Each kernel's output is checked against the blocks kernel's (poisoned first),
// then each is timed over input sets rotated past L2 (CUDA events around 50
// calls a set round; median of 15), beside a device copy of the valid bytes.
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int BS = 64, DATA = 576, SCALE = 8, PAGE = BS * (DATA + SCALE), OUT = 1024, WARPS = 4;

template <int STAGES>
struct Held {
  uint2 v[STAGES][2];   // a lane's two chunks: 8 fp8 bytes (or 16 tail bytes in v+t)
  uint2 t[STAGES][2];
  uint32_t s[STAGES][2];
  int row[STAGES];
};

// Lane l moves output chunks l and l + 32 (64 chunks of 16 bytes): chunks < 56
// are 8 value bytes and their group's scale byte, the rest 16 bytes of tail.
template <int STAGES>
__device__ __forceinline__ void load(Held<STAGES>& h, int s, const uint8_t* __restrict__ cache, int slot, int lane) {
  const uint8_t* page = cache + (size_t)(slot / BS) * PAGE;
  int r = slot % BS;
  const uint8_t* data = page + r * DATA;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    int chunk = lane + 32 * p;
    if (chunk < 56) {
      h.v[s][p] = __ldg(reinterpret_cast<const uint2*>(data + chunk * 8));
      h.s[s][p] = __ldg(page + BS * DATA + r * SCALE + chunk / 8);
    } else {
      const uint2* tail = reinterpret_cast<const uint2*>(data + 448 + (chunk - 56) * 16);
      h.v[s][p] = __ldg(tail);
      h.t[s][p] = __ldg(tail + 1);
    }
  }
}

// HINT: the output stores' cache policy: 0 default (write-back), 1 streaming (st.global.cs, evict
// first), 2 write-through (st.global.wt).
template <int STAGES, int HINT = 0>
__device__ __forceinline__ void store(const Held<STAGES>& h, int s, uint8_t* __restrict__ out, int lane) {
  uint8_t* row = out + (size_t)h.row[s] * OUT;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    int chunk = lane + 32 * p;
    uint4 w;
    if (chunk < 56) {  // a stand-in for the decode: widen each byte beside its scale
      uint2 v = h.v[s][p];
      uint32_t sc = h.s[s][p] << 8;
      w.x = __byte_perm(v.x, sc, 0x5150); w.y = __byte_perm(v.x, sc, 0x5352);
      w.z = __byte_perm(v.y, sc, 0x5150); w.w = __byte_perm(v.y, sc, 0x5352);
    } else {
      w = make_uint4(h.v[s][p].x, h.v[s][p].y, h.t[s][p].x, h.t[s][p].y);
    }
    uint4* to = reinterpret_cast<uint4*>(row + chunk * 16);
    if (HINT == 1) __stcs(to, w);
    else if (HINT == 2) __stwt(to, w);
    else *to = w;
  }
}

template <int STAGES, int HINT = 0>
__global__ void __launch_bounds__(WARPS * 32) blocks(const uint8_t* __restrict__ cache, const int* __restrict__ slots,
                                                      uint8_t* __restrict__ out, int n, int scatter = 1) {
  // scatter (odd, the grid a power of two): CTA b takes block b * scatter mod grid, so CTAs that run
  // at once take slots (and write rows) far apart.
  int lane = threadIdx.x % 32;
  int cta = (int)(((long long)blockIdx.x * scatter) % gridDim.x);
  int base = (cta * WARPS + threadIdx.x / 32) * STAGES;
  Held<STAGES> h;
  int slot[STAGES];
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    slot[s] = base + s < n ? __ldg(slots + base + s) : -1;
    h.row[s] = base + s;
  }
#pragma unroll
  for (int s = 0; s < STAGES; ++s)
    if (slot[s] >= 0) load(h, s, cache, slot[s], lane);
#pragma unroll
  for (int s = 0; s < STAGES; ++s)
    if (slot[s] >= 0) store<STAGES, HINT>(h, s, out, lane);
}

// One chunk of CHUNK slots: a lane's slot `mine`, then the valid ones in rounds of STAGES.
template <int STAGES, int CHUNK, int HINT = 0>
__device__ __forceinline__ void move_chunk(const uint8_t* __restrict__ cache, uint8_t* __restrict__ out, int chunk,
                                           int mine, int lane) {
  unsigned pending = __ballot_sync(0xffffffffu, mine >= 0);
  Held<STAGES> h;
  while (pending) {
    int picked[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      int pick = pending ? __ffs(pending) - 1 : -1;
      pending &= pending - 1;
      int slot = __shfl_sync(0xffffffffu, mine, max(pick, 0));
      picked[s] = pick;
      h.row[s] = chunk * CHUNK + pick;
      if (pick >= 0) load(h, s, cache, slot, lane);
    }
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
      if (picked[s] >= 0) store<STAGES, HINT>(h, s, out, lane);
  }
}

template <int STAGES, int CHUNK, int HINT = 0>
__global__ void __launch_bounds__(WARPS * 32) chunks(const uint8_t* __restrict__ cache, const int* __restrict__ slots,
                                                      uint8_t* __restrict__ out, int n, int stagger_ns = 0) {
  int lane = threadIdx.x % 32;
  int chunk = blockIdx.x * WARPS + threadIdx.x / 32;
  if (stagger_ns) __nanosleep((chunk % 8) * stagger_ns);  // warps out of step from the start
  int i = chunk * CHUNK + lane;
  int mine = lane < CHUNK && i < n ? __ldg(slots + i) : -1;
  move_chunk<STAGES, CHUNK, HINT>(cache, out, chunk, mine, lane);
}

// chunks, its lanes' slots interleaved over the call: lane l of chunk c holds slot c + l * num_chunks,
// so in any round the warps write rows close together.
template <int STAGES, int CHUNK>
__global__ void __launch_bounds__(WARPS * 32) interleaved(const uint8_t* __restrict__ cache,
                                                           const int* __restrict__ slots, uint8_t* __restrict__ out,
                                                           int n) {
  int lane = threadIdx.x % 32;
  int chunk = blockIdx.x * WARPS + threadIdx.x / 32;
  int num_chunks = (n + CHUNK - 1) / CHUNK;
  int i = chunk + lane * num_chunks;
  int mine = lane < CHUNK && i < n ? __ldg(slots + i) : -1;
  unsigned pending = __ballot_sync(0xffffffffu, mine >= 0);
  Held<STAGES> h;
  while (pending) {
    int picked[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      int pick = pending ? __ffs(pending) - 1 : -1;
      pending &= pending - 1;
      int slot = __shfl_sync(0xffffffffu, mine, max(pick, 0));
      picked[s] = pick;
      h.row[s] = chunk + pick * num_chunks;
      if (pick >= 0) load(h, s, cache, slot, lane);
    }
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
      if (picked[s] >= 0) store(h, s, out, lane);
  }
}

template <int STAGES, int CHUNK>
__global__ void __launch_bounds__(WARPS * 32) queue(const uint8_t* __restrict__ cache, const int* __restrict__ slots,
                                                     uint8_t* __restrict__ out, int n, int* counter) {
  // counter[0]: the next chunk; counter[1]: the warps done (the last one zeroes both)
  int lane = threadIdx.x % 32;
  int num_chunks = (n + CHUNK - 1) / CHUNK;
  int taken = 0;
  if (lane == 0) taken = atomicAdd(counter, 1);
  int chunk = __shfl_sync(0xffffffffu, taken, 0);
  int i = chunk * CHUNK + lane;
  int mine = chunk < num_chunks && lane < CHUNK && i < n ? __ldg(slots + i) : -1;
  while (chunk < num_chunks) {
    // The next chunk taken and its slots loaded before this one is moved.
    if (lane == 0) taken = atomicAdd(counter, 1);
    int next = __shfl_sync(0xffffffffu, taken, 0);
    int j = next * CHUNK + lane;
    int next_mine = next < num_chunks && lane < CHUNK && j < n ? __ldg(slots + j) : -1;
    move_chunk<STAGES, CHUNK>(cache, out, chunk, mine, lane);
    chunk = next;
    mine = next_mine;
  }
  if (lane == 0 && atomicAdd(counter + 1, 1) == gridDim.x * WARPS - 1) {  // every warp has taken its last
    counter[0] = 0;
    counter[1] = 0;
  }
}

__global__ void fill(uint8_t* p, size_t n, uint32_t seed) {  // bytes that tell every record apart
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = (uint8_t)(((i + seed) * 2654435761u) >> 13);
}

struct Set {
  uint8_t *cache, *out;
  int* slots;
};

int main(int argc, char** argv) {
  // --once: 100% valid only, each kernel checked (one call) and not timed -- for ncu.
  const bool once = argc > 1 && std::string(argv[1]) == "--once";
  const int n = 65536, pages = n / BS + 3;
  int sms, dev = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const size_t set_bytes = (size_t)pages * PAGE + (size_t)n * OUT;
  const int num_sets = std::max<int>(2, (int)(4.0 * prop.l2CacheSize / set_bytes) + 1);
  printf("%s, %d SMs, %d input sets\n", prop.name, sms, num_sets);
  int* counter;
  CHECK(cudaMalloc(&counter, 2 * sizeof(int)));
  CHECK(cudaMemset(counter, 0, 2 * sizeof(int)));
  uint8_t *copy_src, *copy_dst;
  CHECK(cudaMalloc(&copy_src, (size_t)num_sets * n * (584 + OUT)));
  CHECK(cudaMalloc(&copy_dst, (size_t)num_sets * n * (584 + OUT)));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::mt19937 rng(1);
  for (double valid : {0.03, 0.25, 1.0}) {
    if (once && valid < 1.0) continue;
    std::vector<Set> sets(num_sets);
    int valid_slots = 0;
    for (int k = 0; k < num_sets; ++k) {
      CHECK(cudaMalloc(&sets[k].cache, (size_t)pages * PAGE));
      CHECK(cudaMalloc(&sets[k].out, (size_t)n * OUT));
      CHECK(cudaMalloc(&sets[k].slots, n * sizeof(int)));
      fill<<<1024, 256>>>(sets[k].cache, (size_t)pages * PAGE, k);
      std::vector<int> host(n);
      std::uniform_int_distribution<int> slot(0, pages * BS - 1);
      std::uniform_real_distribution<double> u(0, 1);
      int count = 0;
      for (int& s : host) { s = u(rng) < valid ? slot(rng) : -1; count += s >= 0; }
      if (k == 0) valid_slots = count;
      CHECK(cudaMemcpy(sets[k].slots, host.data(), n * sizeof(int), cudaMemcpyHostToDevice));
    }
    // A copy of the valid bytes: it reads and writes half of them each, as the bench's does.
    size_t copy_bytes = ((size_t)valid_slots * (584 + OUT) / 2 + 65535) / 65536 * 65536;
    auto time = [&](auto&& call) {
      std::vector<float> ms;
      for (int warm = 0; warm < 3; ++warm)
        for (int k = 0; k < num_sets; ++k) call(sets[k], k);
      for (int rep = 0; rep < 15; ++rep) {
        CHECK(cudaEventRecord(a, stream));
        for (int it = 0; it < 50; ++it)
          for (int k = 0; k < num_sets; ++k) call(sets[k], k);
        CHECK(cudaEventRecord(b, stream));
        CHECK(cudaEventSynchronize(b));
        float t;
        CHECK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      CHECK(cudaGetLastError());
      return ms[ms.size() / 2] * 1000.0 / (50 * num_sets);
    };
    double copy_us = time([&](Set&, int k) {
      CHECK(cudaMemcpyAsync(copy_dst + k * copy_bytes, copy_src + k * copy_bytes, copy_bytes,
                            cudaMemcpyDeviceToDevice, stream));
    });
    printf("valid %.0f%% (%d slots): copy %.2f us\n", valid * 100, valid_slots, copy_us);
    std::vector<uint8_t> expected((size_t)n * OUT), got((size_t)n * OUT);
    bool first = true;
    auto report = [&](const char* name, auto&& call) {
      CHECK(cudaMemset(sets[0].out, 0xA5, (size_t)n * OUT));
      call(sets[0], 0);
      CHECK(cudaStreamSynchronize(stream));
      CHECK(cudaMemcpy((first ? expected : got).data(), sets[0].out, got.size(), cudaMemcpyDeviceToHost));
      if (!first && got != expected) { printf("  %s: output differs from blocks s2\n", name); exit(1); }
      first = false;
      if (once) return;
      double us = time(call);
      printf("  %-22s %8.2f us  %.3f of copy\n", name, us, copy_us / us);
    };
    report("blocks s2", [&](Set& s, int) {
      blocks<2><<<(n + WARPS * 2 - 1) / (WARPS * 2), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("blocks s2 scattered", [&](Set& s, int) {
      blocks<2><<<n / (WARPS * 2), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n, 1021); });
    report("interleaved s2 c16", [&](Set& s, int) {
      interleaved<2, 16><<<n / (WARPS * 16), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("interleaved s2 c32", [&](Set& s, int) {
      interleaved<2, 32><<<n / (WARPS * 32), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("interleaved s4 c32", [&](Set& s, int) {
      interleaved<4, 32><<<n / (WARPS * 32), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("blocks s2 cs", [&](Set& s, int) {
      blocks<2, 1><<<(n + WARPS * 2 - 1) / (WARPS * 2), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s2 c16 cs", [&](Set& s, int) {
      chunks<2, 16, 1><<<(n + WARPS * 16 - 1) / (WARPS * 16), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s2 c16 wt", [&](Set& s, int) {
      chunks<2, 16, 2><<<(n + WARPS * 16 - 1) / (WARPS * 16), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s4 c32 cs", [&](Set& s, int) {
      chunks<4, 32, 1><<<(n + WARPS * 32 - 1) / (WARPS * 32), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("blocks s4", [&](Set& s, int) {
      blocks<4><<<(n + WARPS * 4 - 1) / (WARPS * 4), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s2 c4", [&](Set& s, int) {
      chunks<2, 4><<<(n + WARPS * 4 - 1) / (WARPS * 4), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s2 c8", [&](Set& s, int) {
      chunks<2, 8><<<(n + WARPS * 8 - 1) / (WARPS * 8), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    for (int stagger : {0, 250, 500, 1000}) {
      char label[64];
      snprintf(label, sizeof label, "chunks s2 c16 +%dns", stagger);
      report(label, [&](Set& s, int) {
        chunks<2, 16><<<(n + WARPS * 16 - 1) / (WARPS * 16), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n,
                                                                                     stagger); });
    }
    report("chunks s2 c32", [&](Set& s, int) {
      chunks<2, 32><<<(n + WARPS * 32 - 1) / (WARPS * 32), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    report("chunks s4 c32", [&](Set& s, int) {
      chunks<4, 32><<<(n + WARPS * 32 - 1) / (WARPS * 32), WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n); });
    auto queue_call = [&](auto kernel, const char* name) {
      int per_sm;
      CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, 0));
      for (int share : {1, 2}) {  // the resident grid, and half of it
        int grid = sms * per_sm / share;
        char label[64];
        snprintf(label, sizeof label, "%s grid %d", name, grid);
        report(label, [&](Set& s, int) {
          kernel<<<grid, WARPS * 32, 0, stream>>>(s.cache, s.slots, s.out, n, counter); });
      }
    };
    queue_call(queue<2, 16>, "queue s2 c16");
    queue_call(queue<2, 8>, "queue s2 c8");
    for (auto& s : sets) { cudaFree(s.cache); cudaFree(s.out); cudaFree(s.slots); }
  }
  return 0;
}
