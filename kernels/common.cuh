// Shared by every kernel file: storage types, conversions and warp reductions.
//
// No CUDA headers are included on purpose: the kernels compile with NVRTC given nothing but
// their own text (no include paths to find on the device), and with nvcc alike. bf16 and f16
// values are stored as 16-bit patterns and converted with the PTX `cvt` instructions
// (round-to-nearest-even, as the CPU side's `half` crate does).
//
// Conventions for every kernel:
// - element type T is float, bf16_t or f16_t; all arithmetic is in float;
// - sizes that can exceed 2^31 elements are `long long`; per-row sizes are `int`;
// - each extern "C" entry point is named `<op>_<f32|bf16|f16>`.
#pragma once

struct bf16_t {
    unsigned short bits;
};
struct f16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_float(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Threads per block of the elementwise kernels and of the warp-per-row kernels (8 rows a block).
#define SETAR_BLOCK 256
#define SETAR_ROWS_PER_BLOCK (SETAR_BLOCK / 32)

// Stamps one extern "C" entry point per storage type from a macro taking (T, suffix).
#define SETAR_FOR_EACH_TYPE(M) M(float, f32) M(bf16_t, bf16) M(f16_t, f16)
