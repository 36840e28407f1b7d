// The index of the first non-finite value (NaN or ±inf) of x[0..n), written into *first by
// atomicMin (the caller sets it to ~0 first; it stays so when every value is finite): a check
// whose answer is one integer, so that features can stay on the device. CPU twin:
// `Backend::first_non_finite`'s default (`Iterator::position`).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void first_non_finite_impl(const T* x, long long n,
                                                      unsigned long long* first) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // All exponent bits set: inf or NaN (bf16 and f16 keep both through the conversion).
        if ((__float_as_uint(to_float(x[i])) & 0x7f800000u) == 0x7f800000u) {
            atomicMin(first, (unsigned long long)i);
            return;  // this thread's later values have larger indices
        }
    }
}

#define FIRST_NON_FINITE(T, S)                                                                \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        first_non_finite_##S(const T* x, long long n, unsigned long long* first) {            \
        first_non_finite_impl<T>(x, n, first);                                                \
    }
SETAR_FOR_EACH_TYPE(FIRST_NON_FINITE)
