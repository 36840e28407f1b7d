// Residual add in place: x += y over n elements. CPU twin: `CpuBackend::add_assign`.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void add_assign_impl(T* x, const T* y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
}

#define ADD_ASSIGN(T, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        add_assign_##S(T* x, const T* y, long long n) {                                       \
        add_assign_impl<T>(x, y, n);                                                          \
    }
SETAR_FOR_EACH_TYPE(ADD_ASSIGN)
