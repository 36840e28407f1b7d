// Residual add in place: x += y over n elements. CPU twin: `CpuBackend::add_assign`.
// `add_assign_into_f32_*`: the residual stream x in f32, the block output y in storage type.
#include "common.cuh"

template <typename TX, typename T>
__device__ __forceinline__ void add_assign_impl(TX* x, const T* y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = from_float<TX>(to_float(x[i]) + to_float(y[i]));
}

#define ADD_ASSIGN(T, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        add_assign_##S(T* x, const T* y, long long n) {                                       \
        add_assign_impl<T, T>(x, y, n);                                                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        add_assign_into_f32_##S(float* x, const T* y, long long n) {                          \
        add_assign_impl<float, T>(x, y, n);                                                   \
    }
SETAR_FOR_EACH_TYPE(ADD_ASSIGN)
