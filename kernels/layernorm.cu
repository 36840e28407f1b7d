// LayerNorm over the last dimension, one warp per row, two passes (mean, then the variance of
// the deviations) like the CPU twin `backend::cpu::layer_norm_into`. Input, parameters and
// output may differ in type: with bf16 / f16 storage the residual stream is kept in f32
// (`layer_norm_from_f32_*` reads it, `layer_norm_f32_to_f32_*` starts it: the vision pre-LN).
// Rows of up to 1024 values whose width is a multiple of 4 (CLIP's 768 and 1024), with aligned
// pointers, are read once, 4 values per load (16 bytes in f32), and kept in registers; any
// other row takes the plain loop, which reads it three times one value at a time.
#include "common.cuh"

template <typename TX, typename T, typename TO>
__device__ __forceinline__ void layer_norm_impl(const TX* x, const T* gamma, const T* beta, TO* out,
                                                int rows, int dim, float eps) {
    int row = blockIdx.x * SETAR_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const TX* xr = x + (long long)row * dim;
    TO* orow = out + (long long)row * dim;
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) s += to_float(xr[i]);
    float mean = warp_sum(s) / (float)dim;
    float v = 0.f;
    for (int i = lane; i < dim; i += 32) {
        float d = to_float(xr[i]) - mean;
        v += d * d;
    }
    float inv = 1.0f / sqrtf(warp_sum(v) / (float)dim + eps);
    for (int i = lane; i < dim; i += 32)
        orow[i] = from_float<TO>((to_float(xr[i]) - mean) * inv * to_float(gamma[i]) +
                                to_float(beta[i]));
}

// Four consecutive values to / from float (16 bytes in f32, 8 in bf16 / f16).
__device__ __forceinline__ void load4(const float* p, float* v) {
    float4 a = *(const float4*)p;
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
template <typename T> __device__ __forceinline__ void load4(const T* p, float* v) {
    uint2 a = *(const uint2*)p;
    T e[4];
    e[0].bits = (unsigned short)(a.x & 0xffffu), e[1].bits = (unsigned short)(a.x >> 16);
    e[2].bits = (unsigned short)(a.y & 0xffffu), e[3].bits = (unsigned short)(a.y >> 16);
    for (int i = 0; i < 4; ++i) v[i] = to_float(e[i]);
}
__device__ __forceinline__ void store4(float* p, const float* v) {
    *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T> __device__ __forceinline__ void store4(T* p, const float* v) {
    uint2 a;
    a.x = (unsigned)from_float<T>(v[0]).bits | ((unsigned)from_float<T>(v[1]).bits << 16);
    a.y = (unsigned)from_float<T>(v[2]).bits | ((unsigned)from_float<T>(v[3]).bits << 16);
    *(uint2*)p = a;
}

#define LN_CHUNKS 8  // 4-value chunks per lane: rows of up to 32 * 4 * 8 = 1024 values

template <typename TX, typename T, typename TO>
__device__ __forceinline__ bool layer_norm_vectorised(const TX* x, const T* gamma, const T* beta,
                                                      TO* out, int dim) {
    // Row starts stay aligned when dim is a multiple of 4.
    return dim % 4 == 0 && dim <= 32 * 4 * LN_CHUNKS &&
           (unsigned long long)x % (4 * sizeof(TX)) == 0 &&
           (unsigned long long)gamma % (4 * sizeof(T)) == 0 &&
           (unsigned long long)beta % (4 * sizeof(T)) == 0 &&
           (unsigned long long)out % (4 * sizeof(TO)) == 0;
}

template <typename TX, typename T, typename TO>
__device__ __forceinline__ void layer_norm_vec_impl(const TX* x, const T* gamma, const T* beta,
                                                    TO* out, int rows, int dim, float eps) {
    int row = blockIdx.x * SETAR_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const TX* xr = x + (long long)row * dim;
    TO* orow = out + (long long)row * dim;
    float v[LN_CHUNKS][4];
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; ++c) {
        int i = (c * 32 + lane) * 4;
        if (i < dim) {
            load4(xr + i, v[c]);
            s += (v[c][0] + v[c][1]) + (v[c][2] + v[c][3]);
        }
    }
    float mean = warp_sum(s) / (float)dim;
    float q = 0.f;
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; ++c) {
        int i = (c * 32 + lane) * 4;
        if (i < dim) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float d = v[c][e] - mean;
                q += d * d;
            }
        }
    }
    float inv = 1.0f / sqrtf(warp_sum(q) / (float)dim + eps);
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; ++c) {
        int i = (c * 32 + lane) * 4;
        if (i < dim) {
            float gm[4], bt[4], r[4];
            load4(gamma + i, gm);
            load4(beta + i, bt);
#pragma unroll
            for (int e = 0; e < 4; ++e) r[e] = (v[c][e] - mean) * inv * gm[e] + bt[e];
            store4(orow + i, r);
        }
    }
}

template <typename TX, typename T, typename TO>
__device__ __forceinline__ void layer_norm_any(const TX* x, const T* gamma, const T* beta, TO* out,
                                               int rows, int dim, float eps) {
    if (layer_norm_vectorised(x, gamma, beta, out, dim))
        layer_norm_vec_impl<TX, T, TO>(x, gamma, beta, out, rows, dim, eps);
    else
        layer_norm_impl<TX, T, TO>(x, gamma, beta, out, rows, dim, eps);
}

#define LAYER_NORM(T, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_##S(const T* x, const T* gamma, const T* beta, T* out, int rows, int dim,  \
                       float eps) {                                                           \
        layer_norm_any<T, T, T>(x, gamma, beta, out, rows, dim, eps);                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_from_f32_##S(const float* x, const T* gamma, const T* beta, T* out,        \
                                int rows, int dim, float eps) {                               \
        layer_norm_any<float, T, T>(x, gamma, beta, out, rows, dim, eps);                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_f32_to_f32_##S(const float* x, const T* gamma, const T* beta, float* out,  \
                                  int rows, int dim, float eps) {                             \
        layer_norm_any<float, T, float>(x, gamma, beta, out, rows, dim, eps);                \
    }
SETAR_FOR_EACH_TYPE(LAYER_NORM)
