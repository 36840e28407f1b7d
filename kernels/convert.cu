// Conversions between the f32 the host speaks and the storage type on the device.
// CPU twin: `half::bf16::from_f32` / `half::f16::from_f32` (round to nearest even) and back.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void cast_from_f32_impl(const float* in, T* out, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = from_float<T>(in[i]);
}

template <typename T>
__device__ __forceinline__ void cast_to_f32_impl(const T* in, float* out, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = to_float(in[i]);
}

#define CAST(T, S)                                                                            \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        cast_from_f32_##S(const float* in, T* out, long long n) {                             \
        cast_from_f32_impl<T>(in, out, n);                                                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        cast_to_f32_##S(const T* in, float* out, long long n) {                               \
        cast_to_f32_impl<T>(in, out, n);                                                      \
    }
// f32 storage needs no conversion.
CAST(bf16_t, bf16) CAST(f16_t, f16)
