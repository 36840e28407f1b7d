// LayerNorm over the last dimension, one warp per row, two passes (mean, then the variance of
// the deviations) like the CPU twin `backend::cpu::layer_norm_into`. Input, parameters and
// output may differ in type: with bf16 / f16 storage the residual stream is kept in f32
// (`layer_norm_from_f32_*` reads it, `layer_norm_f32_to_f32_*` starts it: the vision pre-LN).
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

#define LAYER_NORM(T, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_##S(const T* x, const T* gamma, const T* beta, T* out, int rows, int dim,  \
                       float eps) {                                                           \
        layer_norm_impl<T, T, T>(x, gamma, beta, out, rows, dim, eps);                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_from_f32_##S(const float* x, const T* gamma, const T* beta, T* out,        \
                                int rows, int dim, float eps) {                               \
        layer_norm_impl<float, T, T>(x, gamma, beta, out, rows, dim, eps);                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        layer_norm_f32_to_f32_##S(const float* x, const T* gamma, const T* beta, float* out,  \
                                  int rows, int dim, float eps) {                             \
        layer_norm_impl<float, T, float>(x, gamma, beta, out, rows, dim, eps);                \
    }
SETAR_FOR_EACH_TYPE(LAYER_NORM)
