// L2 normalisation of each row in place, one warp per row: x /= ‖x‖ (a zero row gives NaN,
// as the CPU twin `model::clip::l2_normalize_rows` does).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void l2_normalize_impl(T* x, int rows, int dim) {
    int row = blockIdx.x * SETAR_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    T* xr = x + (long long)row * dim;
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) {
        float v = to_float(xr[i]);
        s += v * v;
    }
    float norm = sqrtf(warp_sum(s));
    for (int i = lane; i < dim; i += 32) xr[i] = from_float<T>(to_float(xr[i]) / norm);
}

#define L2_NORMALIZE(T, S)                                                                    \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        l2_normalize_##S(T* x, int rows, int dim) {                                           \
        l2_normalize_impl<T>(x, rows, dim);                                                   \
    }
SETAR_FOR_EACH_TYPE(L2_NORMALIZE)
