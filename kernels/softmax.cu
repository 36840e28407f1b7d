// Masked row softmax of attention scores, one warp per row.
//
// scores: f32 `[batch, heads, queries, ld]` (the GEMM wrote scale·q·kᵀ there, `seq` valid
// columns per row); probs: T, same layout (may be the same memory as scores when T is float:
// every element is read and then written by the same thread). Query i of sequence b sees the
// first n = visible_keys(i, len_b, causal) keys (both masks hide a suffix of the keys); the
// other columns < seq become 0. n == 0 gives a row of zeros. CPU twin: `fastmath::softmax` on
// the prefix, as `backend::cpu::attention_one` does.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void softmax_impl(const float* scores, T* probs, long long rows,
                                             int seq, int ld, int queries, int heads, int causal,
                                             const int* lengths) {
    long long row = (long long)blockIdx.x * SETAR_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long b = row / ((long long)heads * queries);
    int i = (int)(row % queries);
    int len = seq;
    if (lengths != 0) len = min(lengths[b], seq);
    int n = causal ? min(len, i + 1) : len;
    if (n < 0) n = 0;
    const float* s = scores + row * ld;
    T* p = probs + row * ld;
    float m = __uint_as_float(0xff800000u);  // -inf
    for (int j = lane; j < n; j += 32) m = fmaxf(m, s[j]);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < n; j += 32) sum += expf(s[j] - m);
    sum = warp_sum(sum);
    float inv = n > 0 ? 1.0f / sum : 0.f;
    for (int j = lane; j < seq; j += 32) {
        float v = j < n ? expf(s[j] - m) * inv : 0.f;
        p[j] = from_float<T>(v);
    }
}

#define SOFTMAX(T, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        softmax_##S(const float* scores, T* probs, long long rows, int seq, int ld,           \
                    int queries, int heads, int causal, const int* lengths) {                 \
        softmax_impl<T>(scores, probs, rows, seq, ld, queries, heads, causal, lengths);       \
    }
SETAR_FOR_EACH_TYPE(SOFTMAX)
