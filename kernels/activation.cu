// Bias + activation in place: x[r, c] = act(x[r, c] + bias[c]) over `rows` rows of `dim`.
// bias may be null; act: 0 none, 1 quick_gelu x·σ(1.702x), 2 exact erf GELU, 3 tanh GELU.
// CPU twin: `fastmath::activate` (plus the bias add of `backend::cpu::linear_into`).
// Grid: x over the columns of a row, y over rows (looping when rows exceed gridDim.y).
//
// `activate`: the activation alone over n contiguous values (the MLP's hidden layer, after a
// GEMM that added the bias), 16 bytes per load and store (8 bf16/f16 or 4 f32 values), the
// activation chosen once per launch rather than per value; quick_gelu of bf16 / f16 values
// by approximate 2^x and 1/x (`quick_gelu_approx`). x must be 16-byte aligned (the
// caller checks); a grid-stride loop, then a scalar tail.
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
        // erfc below 0, not 1 + erf: for v below about -3, 1 + erf cancels to a few bits in
        // f32 (a relative error of 1e-2 was seen on the H200), where the CPU twin works in f64.
        // (erfc everywhere made ptxas spill in activate_f32.)
        return 0.5f * v * (v >= 0.f ? 1.0f + erff(v * 0.70710678118654752f)
                                     : erfcf(-v * 0.70710678118654752f));
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

// quick_gelu by the multiprocessor's approximate 2^x and 1/x (one instruction each, relative
// errors near 2^-22): far below a bf16 / f16 result's rounding (2^-9, 2^-12), and it leaves the
// 16-bit `activate` bound by memory. The accurate expf and IEEE division of `apply_act` cost
// some 20 instructions a value, which at bf16's 2 bytes a value is as much time as the memory.
// For v below about -52, 2^x overflows and the result is -0 (the exact one is under 1e-36).
__device__ __forceinline__ float quick_gelu_approx(float v) {
    float e, r;
    asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(v * -2.4554669595930157f)); // -1.702·log2(e)
    asm("rcp.approx.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
    return v * r;
}

// The activation `ACT` of one value of a 16-bit type (f32 keeps `apply_act`'s accurate form).
template <int ACT> __device__ __forceinline__ float act_half(float v) {
    return ACT == SETAR_ACT_QUICK_GELU ? quick_gelu_approx(v) : apply_act(v, ACT);
}

// The activation `ACT` of the values in one 32-bit word: one f32, or two bf16 / f16 (the low
// half first). Words, not a T* into the 16-byte load, so that the load stays in registers.
template <typename T, int ACT>
__device__ __forceinline__ unsigned act_word(unsigned w) {
    if constexpr (sizeof(T) == 4) {
        return __float_as_uint(apply_act(__uint_as_float(w), ACT));
    } else {
        T lo, hi;
        lo.bits = (unsigned short)(w & 0xffffu);
        hi.bits = (unsigned short)(w >> 16);
        return (unsigned)from_float<T>(act_half<ACT>(to_float(lo))).bits |
               ((unsigned)from_float<T>(act_half<ACT>(to_float(hi))).bits << 16);
    }
}

// The activation `ACT` over n values of x, V = 16 / sizeof(T) at a time.
template <typename T, int ACT>
__device__ __forceinline__ void activate_loop(T* x, long long n) {
    constexpr int V = 16 / sizeof(T);
    const long long vectors = n / V;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    uint4* xv = reinterpret_cast<uint4*>(x);
    for (long long i = first; i < vectors; i += stride) {
        uint4 pack = xv[i];
        pack.x = act_word<T, ACT>(pack.x);
        pack.y = act_word<T, ACT>(pack.y);
        pack.z = act_word<T, ACT>(pack.z);
        pack.w = act_word<T, ACT>(pack.w);
        xv[i] = pack;
    }
    for (long long i = vectors * V + first; i < n; i += stride)
        x[i] = from_float<T>(sizeof(T) == 4 ? apply_act(to_float(x[i]), ACT)
                                            : act_half<ACT>(to_float(x[i])));
}

template <typename T>
__device__ __forceinline__ void activate_impl(T* x, long long n, int act) {
    switch (act) {
    case SETAR_ACT_QUICK_GELU:
        activate_loop<T, SETAR_ACT_QUICK_GELU>(x, n);
        break;
    case SETAR_ACT_GELU:
        activate_loop<T, SETAR_ACT_GELU>(x, n);
        break;
    case SETAR_ACT_GELU_TANH:
        activate_loop<T, SETAR_ACT_GELU_TANH>(x, n);
        break;
    default:
        break; // the identity: nothing to write
    }
}

#define ACTIVATE(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        activate_##S(T* x, long long n, int act) {                                            \
        activate_impl<T>(x, n, act);                                                          \
    }
SETAR_FOR_EACH_TYPE(ACTIVATE)
