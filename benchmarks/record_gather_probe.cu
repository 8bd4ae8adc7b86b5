// A decode-free gather of page-split records (benchmarks/record_gather_probe.py).
//
// The least work any sparse bf16 gather of these records does: for each slot,
// read its data row and its scale row where the page-split format lays them,
// and write its 2-byte-a-value output row; no decoding. Each output value is
// a 16-bit word built from its stored bits (the value byte or nibble, in the
// low byte, and its scale group's byte, in the high byte), so every byte read
// feeds the output and the output can be checked.
//
// A warp gathers UNROLL consecutive output rows: it loads their slots, then
// all their records, then stores them all, so UNROLL records per warp are in
// flight. One pass, no grid stride: grid = ceil(tokens / (UNROLL * 8 warps)).
//
//   indexer (132 B: 128 e4m3 + one float32 scale): lane l reads value bytes
//     4l..4l+3 and the scale's 4 bytes; out word i = byte i | scale byte (i % 4) << 8.
//   nvfp4 (288 B: 256 bytes of e2m1 pairs + 32 e4m3 scales): lane l reads value
//     bytes 8l..8l+7 (values 16l..16l+15, one scale group) and scale byte l;
//     out word i = nibble i | scale byte (i / 16) << 8.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

constexpr int WARPS = 8;

template <int UNROLL>
__device__ void gather_indexer(const int* __restrict__ slots, const uint8_t* __restrict__ cache,
                               uint8_t* __restrict__ out, int tokens, int block_size, long long page_bytes) {
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * WARPS + threadIdx.x / 32) * UNROLL;
    int slot[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) slot[u] = first + u < tokens ? slots[first + u] : -1;
    uint32_t value[UNROLL], scale[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] < 0) continue;
        const uint8_t* page = cache + (long long)(slot[u] / block_size) * page_bytes;
        const int row = slot[u] % block_size;
        value[u] = reinterpret_cast<const uint32_t*>(page + row * 128)[lane];
        scale[u] = *reinterpret_cast<const uint32_t*>(page + block_size * 128 + row * 4);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] < 0) continue;
        uint32_t v = value[u], s = scale[u];
        uint2 words;
        words.x = (v & 0xFF) | ((s & 0xFF) << 8) | ((v & 0xFF00) << 8) | ((s & 0xFF00) << 16);
        words.y = ((v >> 16) & 0xFF) | (((s >> 16) & 0xFF) << 8) | ((v >> 24) << 16) | ((s >> 24) << 24);
        reinterpret_cast<uint2*>(out + (long long)(first + u) * 256)[lane] = words;
    }
}

template <int UNROLL>
__device__ void gather_nvfp4(const int* __restrict__ slots, const uint8_t* __restrict__ cache,
                             uint8_t* __restrict__ out, int tokens, int block_size, long long page_bytes) {
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * WARPS + threadIdx.x / 32) * UNROLL;
    int slot[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) slot[u] = first + u < tokens ? slots[first + u] : -1;
    uint2 value[UNROLL];
    uint32_t scale[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] < 0) continue;
        const uint8_t* page = cache + (long long)(slot[u] / block_size) * page_bytes;
        const int row = slot[u] % block_size;
        value[u] = reinterpret_cast<const uint2*>(page + row * 256)[lane];
        scale[u] = page[block_size * 256 + row * 32 + lane];
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] < 0) continue;
        const uint32_t hi = scale[u] << 8;
        uint32_t w[8];  // 16 out words, two a uint32
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            const uint32_t byte = ((b < 4 ? value[u].x : value[u].y) >> (8 * (b % 4))) & 0xFF;
            w[b] = ((byte & 0xF) | hi) | (((byte >> 4) | hi) << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(out + (long long)(first + u) * 1024) + 2 * lane;
        dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
        dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
}

// The indexer's real decode, registers only: a record's 16 output chunks (8
// bf16 values, 16 bytes each) are 16 lanes' work, so a warp moves 2 records a
// pass and holds PASSES passes in flight. Lane c of its half loads value bytes
// 8c..8c+7 and the float32 scale, and stores bf16(e4m3 * scale) (the e4m3 to
// half conversion is exact, the float32 product rounds once, as kvgen's).
template <int PASSES>
__device__ void decode_indexer(const int* __restrict__ slots, const uint8_t* __restrict__ cache,
                               uint8_t* __restrict__ out, int tokens, int block_size, long long page_bytes) {
    const int lane = threadIdx.x % 16;
    const int first = (blockIdx.x * WARPS + threadIdx.x / 32) * 2 * PASSES + (threadIdx.x % 32) / 16;
    int slot[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) slot[p] = first + 2 * p < tokens ? slots[first + 2 * p] : -1;
    uint2 value[PASSES];
    float scale[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        if (slot[p] < 0) continue;
        const uint8_t* page = cache + (long long)(slot[p] / block_size) * page_bytes;
        const int row = slot[p] % block_size;
        value[p] = reinterpret_cast<const uint2*>(page + row * 128)[lane];
        scale[p] = *reinterpret_cast<const float*>(page + block_size * 128 + row * 4);
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        if (slot[p] < 0) continue;
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t pair = ((k < 2 ? value[p].x : value[p].y) >> (16 * (k % 2))) & 0xFFFF;
            const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
            const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale[p], f.y * scale[p]);
            w[k] = *reinterpret_cast<const uint32_t*>(&b);
        }
        reinterpret_cast<uint4*>(out + (long long)(first + 2 * p) * 256)[lane] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) decode_indexer_p2(
    const int* slots, const uint8_t* cache, uint8_t* out, int tokens, int block_size, long long page_bytes) {
    decode_indexer<2>(slots, cache, out, tokens, block_size, page_bytes);
}
extern "C" __global__ void __launch_bounds__(WARPS * 32) decode_indexer_p4(
    const int* slots, const uint8_t* cache, uint8_t* out, int tokens, int block_size, long long page_bytes) {
    decode_indexer<4>(slots, cache, out, tokens, block_size, page_bytes);
}

#define PROBE(fmt, u)                                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gather_##fmt##_u##u(                             \
        const int* slots, const uint8_t* cache, uint8_t* out, int tokens, int block_size, long long page_bytes) { \
        gather_##fmt<u>(slots, cache, out, tokens, block_size, page_bytes);                                   \
    }

PROBE(indexer, 1)
PROBE(indexer, 2)
PROBE(indexer, 4)
PROBE(indexer, 8)
PROBE(nvfp4, 1)
PROBE(nvfp4, 2)
PROBE(nvfp4, 4)
PROBE(nvfp4, 8)
