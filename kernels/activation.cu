// Bias + activation in place: x[r, c] = act(x[r, c] + bias[c]) over `rows` rows of `dim`.
// bias may be null; act: 0 none, 1 quick_gelu x·σ(1.702x), 2 exact erf GELU, 3 tanh GELU.
// CPU twin: `fastmath::activate` (plus the bias add of `backend::cpu::linear_into`).
// Grid: x over the columns of a row, y over rows (looping when rows exceed gridDim.y).
#include "common.cuh"

#define SETAR_ACT_NONE 0
#define SETAR_ACT_QUICK_GELU 1
#define SETAR_ACT_GELU 2
#define SETAR_ACT_GELU_TANH 3

__device__ __forceinline__ float apply_act(float v, int act) {
    switch (act) {
    case SETAR_ACT_QUICK_GELU:
        return v / (1.0f + expf(-1.702f * v));
    case SETAR_ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case SETAR_ACT_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default:
        return v;
    }
}

template <typename T>
__device__ __forceinline__ void bias_act_impl(T* x, const T* bias, long long rows, int dim,
                                              int act) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float b = bias != 0 ? to_float(bias[c]) : 0.f;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        T* px = x + r * dim + c;
        *px = from_float<T>(apply_act(to_float(*px) + b, act));
    }
}

#define BIAS_ACT(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        bias_act_##S(T* x, const T* bias, long long rows, int dim, int act) {                 \
        bias_act_impl<T>(x, bias, rows, dim, act);                                            \
    }
SETAR_FOR_EACH_TYPE(BIAS_ACT)
