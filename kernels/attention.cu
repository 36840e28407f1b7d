// Fused multi-head attention for head_dim 64 in bf16 / f16 (flash-attention style): the
// scores never reach memory. One block of 4 warps per (64 queries, head, sequence); each warp
// owns 16 queries. Keys and values go through shared memory 64 at a time; S = Q·Kᵀ and O += P·V
// run on the tensor cores (mma.sync m16n8k16, f32 accumulation) with an online softmax in f32
// registers. Masks as `softmax.cu`: query i of sequence b sees the first
// visible_keys(i, len_b, causal) keys; a query that sees none gets zeros.
// CPU twin: `backend::cpu::attention_one` (tests/cuda.rs compares the two).
//
// q: [batch·queries, heads·64], k and v: [batch·seq, heads·64], out like q; lengths: int per
// sequence or null. Launch: grid (ceil(queries / 64), heads, batch), block 128.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_Q (16 * ATT_WARPS)
#define ATT_K 64
#define ATT_D 64
#define ATT_PAD 8

__device__ __forceinline__ unsigned ld32(const void* p) { return *(const unsigned*)p; }

template <bool BF16>
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats → one register of two 16-bit values, `lo` in the low half (the smaller column).
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (BF16)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <typename T, bool BF16>
__device__ __forceinline__ void flash_attention_impl(const T* q, const T* k, const T* v, T* out,
                                                     int seq, int queries, int heads,
                                                     float scale, int causal,
                                                     const int* lengths) {
    __shared__ __align__(16) unsigned short ks[ATT_K][ATT_D + ATT_PAD];
    __shared__ __align__(16) unsigned short vs[ATT_K][ATT_D + ATT_PAD];
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long long w = (long long)heads * ATT_D;
    const int q_block = blockIdx.x * ATT_Q;
    const int i0 = q_block + warp * 16 + g, i1 = i0 + 8;  // this thread's two query rows
    int len = seq;
    if (lengths != 0) len = min(lengths[b], seq);
    if (len < 0) len = 0;
    const int n0 = causal ? min(len, i0 + 1) : len;
    const int n1 = causal ? min(len, i1 + 1) : len;
    const int kv_end = causal ? min(len, q_block + ATT_Q) : len;

    // Q as A fragments, one per 16 head dims.
    unsigned qa[4][4];
    const T* q0 = q + ((long long)b * queries + i0) * w + (long long)h * ATT_D;
    const T* q1 = q + ((long long)b * queries + i1) * w + (long long)h * ATT_D;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = i0 < queries ? ld32(q0 + c) : 0u;
        qa[kk][1] = i1 < queries ? ld32(q1 + c) : 0u;
        qa[kk][2] = i0 < queries ? ld32(q0 + c + 8) : 0u;
        qa[kk][3] = i1 < queries ? ld32(q1 + c + 8) : 0u;
    }

    const float neg_inf = __int_as_float(0xff800000);
    float o[8][4];
#pragma unroll
    for (int d = 0; d < 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = neg_inf, m1 = neg_inf, l0 = 0.f, l1 = 0.f;

    for (int j0 = 0; j0 < kv_end; j0 += ATT_K) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < ATT_K * ATT_D / 2; idx += blockDim.x) {
            int r = idx / (ATT_D / 2), c = (idx % (ATT_D / 2)) * 2;
            int j = j0 + r;
            unsigned kw = 0u, vw = 0u;
            if (j < seq) {
                long long off = ((long long)b * seq + j) * w + (long long)h * ATT_D + c;
                kw = ld32(k + off);
                vw = ld32(v + off);
            }
            *(unsigned*)&ks[r][c] = kw;
            *(unsigned*)&vs[r][c] = vw;
        }
        __syncthreads();

        // S = Q·Kᵀ for these 64 keys: 8 tiles of 8 keys.
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const unsigned short* kr = &ks[nt * 8 + g][kk * 16 + 2 * t];
                mma16816<BF16>(s[nt], qa[kk], ld32(kr), ld32(kr + 8));
            }
        }
        // Scale and mask; the rows' maxima over the quad's four threads.
        float mx0 = neg_inf, mx1 = neg_inf;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = j0 + nt * 8 + 2 * t + (e & 1);
                int n = e < 2 ? n0 : n1;
                s[nt][e] = j < n ? s[nt][e] * scale : neg_inf;
            }
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
        // A row that has seen no key yet keeps a finite base, so that exp() gives 0, not NaN.
        float base0 = new0 == neg_inf ? 0.f : new0, base1 = new1 == neg_inf ? 0.f : new1;
        float alpha0 = expf(m0 - base0), alpha1 = expf(m1 - base1);
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = expf(s[nt][0] - base0);
            s[nt][1] = expf(s[nt][1] - base0);
            s[nt][2] = expf(s[nt][2] - base1);
            s[nt][3] = expf(s[nt][3] - base1);
            sum0 += s[nt][0] + s[nt][1];
            sum1 += s[nt][2] + s[nt][3];
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
        }
        l0 = l0 * alpha0 + sum0;
        l1 = l1 * alpha1 + sum1;
        m0 = new0;
        m1 = new1;
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            o[d][0] *= alpha0;
            o[d][1] *= alpha0;
            o[d][2] *= alpha1;
            o[d][3] *= alpha1;
        }
        // O += P·V: P's accumulator layout is the A-fragment layout of the next product.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned pa[4] = {pack2<BF16>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<BF16>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            int r = kk * 16 + 2 * t;
#pragma unroll
            for (int d = 0; d < 8; ++d) {
                int c = d * 8 + g;
                unsigned b0 = (unsigned)vs[r][c] | ((unsigned)vs[r + 1][c] << 16);
                unsigned b1 = (unsigned)vs[r + 8][c] | ((unsigned)vs[r + 9][c] << 16);
                mma16816<BF16>(o[d], pa, b0, b1);
            }
        }
    }

    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* out0 = out + ((long long)b * queries + i0) * w + (long long)h * ATT_D;
    T* out1 = out + ((long long)b * queries + i1) * w + (long long)h * ATT_D;
#pragma unroll
    for (int d = 0; d < 8; ++d) {
        int c = d * 8 + 2 * t;
        if (i0 < queries) *(unsigned*)(out0 + c) = pack2<BF16>(o[d][0] * inv0, o[d][1] * inv0);
        if (i1 < queries) *(unsigned*)(out1 + c) = pack2<BF16>(o[d][2] * inv1, o[d][3] * inv1);
    }
}

extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
    flash_attention_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, int seq,
                         int queries, int heads, float scale, int causal, const int* lengths) {
    flash_attention_impl<bf16_t, true>(q, k, v, out, seq, queries, heads, scale, causal, lengths);
}

extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
    flash_attention_f16(const f16_t* q, const f16_t* k, const f16_t* v, f16_t* out, int seq,
                        int queries, int heads, float scale, int causal, const int* lengths) {
    flash_attention_impl<f16_t, false>(q, k, v, out, seq, queries, heads, scale, causal,
                                       lengths);
}
