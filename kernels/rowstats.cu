// What the search's loss and scores need of each row of logits, so that only these few numbers
// per row (not the [rows, classes] logits) travel to the host. One warp per row.
//
// For row r of `logits [rows, classes]` (f32, already scaled) and its label
// `labels[r / rows_per_label]`, writes out[r * 5 + ...] in double:
//   0 argmax (first on ties, as torch.argmax)
//   1 cross-entropy ln Σ exp(x) − x[label]
//   2 label rank: #{c : x_c > x_label} + #{c < label : x_c = x_label} in the total order of
//     f32 (the label is in the top K iff rank < K)
//   3 entropy −Σ p ln(p + 1e-5), p = softmax(x)
//   4 Σ exp((x − max) / T) (MCM's largest probability is its inverse)
// CPU twin: `backend::row_stats::row_stats_host` (the loss's and the scores' own formulas).
#include "common.cuh"

// A key whose signed order is the total order of the floats (as loss.rs's `key`).
__device__ __forceinline__ int total_key(float x) {
    int b = __float_as_int(x);
    return b ^ (int)(((unsigned int)(b >> 31)) >> 1);
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Writes row `row`'s five statistics (lane 0), from the warp's reduced values.
__device__ __forceinline__ void write_stats(double* out, int row, int arg, float m, double s,
                                            float xl, int rank, double h, double st) {
    double* o = out + (long long)row * 5;
    o[0] = (double)arg;
    o[1] = (double)m + log(s) - (double)xl;
    o[2] = (double)rank;
    o[3] = -h;
    o[4] = st;
}

// Max with its first index across the warp (ties to the lower index, as torch.argmax).
__device__ __forceinline__ void warp_argmax(float& m, int& arg) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, m, o);
        int oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (om > m || (om == m && oa < arg)) {
            m = om;
            arg = oa;
        }
    }
}

// A row of at most 32·V classes, held in registers: one read of the logits, one exp per value.
// Lane `lane` holds classes lane, lane + 32, … in order, so every sum adds the same terms in
// the same order as the streaming version below: the results are the same bits.
template <int V>
__device__ __forceinline__ void row_stats_in_registers(const float* x, int classes, int label,
                                                       float inv_t, int lane, double* out,
                                                       int row) {
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int c = lane + 32 * i;
        v[i] = c < classes ? x[c] : 0.f;
    }
    float xl = x[label];
    int kl = total_key(xl);
    float m = -__int_as_float(0x7f800000);
    int arg = 0x7fffffff;
    int rank = 0;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int c = lane + 32 * i;
        if (c < classes) {
            if (v[i] > m || (v[i] == m && c < arg)) {
                m = v[i];
                arg = c;
            }
            int k = total_key(v[i]);
            rank += (c < label) ? (k >= kl) : (c > label && k > kl);
        }
    }
    warp_argmax(m, arg);
    rank = warp_sum_i(rank);

    double s = 0.0, st = 0.0;
    const bool t1 = inv_t == 1.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        if (lane + 32 * i < classes) {
            float d = v[i] - m;
            float e = expf(d);
            s += (double)e;
            st += (double)(t1 ? e : expf(d * inv_t));
            v[i] = e;  // kept for the entropy
        }
    }
    s = warp_sum_d(s);
    st = warp_sum_d(st);

    float inv = (float)(1.0 / s);
    double h = 0.0;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        if (lane + 32 * i < classes) {
            float p = v[i] * inv;
            h += (double)(p * logf(p + 1e-5f));
        }
    }
    h = warp_sum_d(h);
    if (lane == 0) write_stats(out, row, arg, m, s, xl, rank, h, st);
}

// Any number of classes: three passes over the row (from the caches after the first).
__device__ __forceinline__ void row_stats_streaming(const float* x, int classes, int label,
                                                    float inv_t, int lane, double* out,
                                                    int row) {
    float xl = x[label];
    int kl = total_key(xl);

    // Pass 1: max with its first index, and the label's rank.
    float m = -__int_as_float(0x7f800000);
    int arg = 0x7fffffff;
    int rank = 0;
    for (int c = lane; c < classes; c += 32) {
        float v = x[c];
        if (v > m || (v == m && c < arg)) {
            m = v;
            arg = c;
        }
        int k = total_key(v);
        rank += (c < label) ? (k >= kl) : (c > label && k > kl);
    }
    warp_argmax(m, arg);
    rank = warp_sum_i(rank);

    // Pass 2: Σ exp(x − m) and Σ exp((x − m)/T) (the same terms at T = 1, the loss's case).
    double s = 0.0, st = 0.0;
    const bool t1 = inv_t == 1.f;
    for (int c = lane; c < classes; c += 32) {
        float d = x[c] - m;
        float e = expf(d);
        s += (double)e;
        st += (double)(t1 ? e : expf(d * inv_t));
    }
    s = warp_sum_d(s);
    st = warp_sum_d(st);

    // Pass 3: the entropy of p = exp(x − m) / s.
    float inv = (float)(1.0 / s);
    double h = 0.0;
    for (int c = lane; c < classes; c += 32) {
        float p = expf(x[c] - m) * inv;
        h += (double)(p * logf(p + 1e-5f));
    }
    h = warp_sum_d(h);
    if (lane == 0) write_stats(out, row, arg, m, s, xl, rank, h, st);
}

// One warp per row; rows of up to 1024 classes (ImageNet's 1000) in registers.
extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)
    row_stats_f32(const float* logits, const int* labels, int rows_per_label, int rows,
                  int classes, float inv_t, double* out) {
    int row = blockIdx.x * SETAR_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* x = logits + (long long)row * classes;
    int label = labels[row / rows_per_label];
    if (classes <= 32 * 8)
        row_stats_in_registers<8>(x, classes, label, inv_t, lane, out, row);
    else if (classes <= 32 * 16)
        row_stats_in_registers<16>(x, classes, label, inv_t, lane, out, row);
    else if (classes <= 32 * 32)
        row_stats_in_registers<32>(x, classes, label, inv_t, lane, out, row);
    else
        row_stats_streaming(x, classes, label, inv_t, lane, out, row);
}

// Per image i of `images`, over its `patches` rows of `stats` (row_stats_f32's output, rows of
// 5 doubles): the sum of the entropies of its OOD patches (label rank >= top_k), their number,
// and the number of rows whose statistics are not finite. One thread per image.
// CPU twin: `backend::row_stats::ood_sums_host`.
extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)
    ood_sums_f32(const double* stats, int images, int patches, int top_k, double* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= images) return;
    double h = 0.0;
    int n = 0, bad = 0;
    for (int p = 0; p < patches; ++p) {
        const double* s = stats + ((long long)i * patches + p) * 5;
        bad += !isfinite(s[1]) || !isfinite(s[3]) || !isfinite(s[4]);
        if (s[2] >= (double)top_k) {
            h += s[3];
            ++n;
        }
    }
    out[i * 3] = h;
    out[i * 3 + 1] = (double)n;
    out[i * 3 + 2] = (double)bad;
}
