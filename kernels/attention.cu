// Fused multi-head attention for head_dim 64 in bf16 / f16 (flash-attention 2 style): the
// scores never reach memory. One block of W warps per (16·W queries, head, sequence); each
// warp owns 16 queries. Two forms: `flash_attention` (W = 4, 64 queries a block) and
// `flash_attention_wide` (W = 8, 128 queries a block): every block streams all of its
// sequence's keys and values, so the wide form reads them half as often (ViT-B/16's 197
// queries: 2 blocks per head and image instead of 4; a text tower's 77: 1 instead of 2).
// Keys and values stream through shared memory 64 at a time, double-buffered with cp.async
// (the next tile lands while this one is used); their fragments come out of
// shared memory by ldmatrix (.trans for V). S = Q·Kᵀ and O += P·V run on the tensor cores
// (mma.sync m16n8k16, f32 accumulation) with an online softmax in f32 registers, in base 2
// (the scale folded with log2 e). Work past the last key and warps past the last query are
// skipped. Masks as `softmax.cu`: query i of sequence b sees the first
// visible_keys(i, len_b, causal) keys; a query that sees none gets zeros.
// CPU twin: `backend::cpu::attention_one` (tests/cuda.rs compares the two).
//
// q: [batch·queries, heads·64], k and v: [batch·seq, heads·64], out like q, all 16-byte
// aligned (the backend checks); lengths: int per sequence or null.
// Launch: grid (ceil(queries / (16·W)), heads, batch), block 32·W.
#include "common.cuh"

#define ATT_K 64
#define ATT_D 64
// A shared row is 144 bytes: the 8 rows one ldmatrix reads fall on 32 distinct banks.
#define ATT_LD (ATT_D + 8)

__device__ __forceinline__ unsigned ld32(const void* p) { return *(const unsigned*)p; }

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global → shared without passing through registers; src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
// Waits until at most one group (the newest) is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() {
    asm volatile("cp.async.wait_group 1;" ::: "memory");
}

// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8, and gets
// (row l / 4, columns 2(l % 4), +1) of each, or with .trans (rows 2(l % 4), +1, column l / 4).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

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

struct KvTiles {
    unsigned short k[2][ATT_K][ATT_LD];
    unsigned short v[2][ATT_K][ATT_LD];
};

// Starts copying keys and values j0 .. j0+63 of (b, h) into stage `st`; rows past the
// sequence become zeros (read from a valid row, 0 bytes taken).
template <int WARPS, typename T>
__device__ __forceinline__ void load_kv_tile(KvTiles& sm, int st, const T* k, const T* v,
                                             int b, int h, int seq, long long w, int j0) {
    for (int c = threadIdx.x; c < ATT_K * ATT_D / 8; c += 32 * WARPS) {
        const int r = c >> 3, col = (c & 7) * 8, j = j0 + r;
        const bool in = j < seq;
        const long long off = ((long long)b * seq + (in ? j : 0)) * w + (long long)h * ATT_D + col;
        cp_async16(smem_addr(&sm.k[st][r][col]), k + off, in ? 16 : 0);
        cp_async16(smem_addr(&sm.v[st][r][col]), v + off, in ? 16 : 0);
    }
}

template <typename T, bool BF16, int WARPS>
__device__ __forceinline__ void flash_attention_impl(const T* q, const T* k, const T* v, T* out,
                                                     int seq, int queries, int heads,
                                                     float scale, int causal,
                                                     const int* lengths) {
    __shared__ __align__(128) KvTiles sm;
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long long w = (long long)heads * ATT_D;
    constexpr int ATT_Q = 16 * WARPS;
    const int q_block = blockIdx.x * ATT_Q;
    const int i0 = q_block + warp * 16 + g, i1 = i0 + 8;  // this thread's two query rows
    // A warp whose 16 rows are all past the last query only helps with the copies.
    const bool active = q_block + warp * 16 < queries;
    int len = seq;
    if (lengths != 0) len = min(lengths[b], seq);
    if (len < 0) len = 0;
    const int n0 = causal ? min(len, i0 + 1) : len;
    const int n1 = causal ? min(len, i1 + 1) : len;
    const int kv_end = causal ? min(len, q_block + ATT_Q) : len;
    const int tiles = (kv_end + ATT_K - 1) / ATT_K;
    const float scale_log2 = scale * 1.4426950408889634f;

    if (tiles > 0) load_kv_tile<WARPS>(sm, 0, k, v, b, h, seq, w, 0);
    cp_async_commit();

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
    // Running maxima (log2 units) and sums of this thread's two rows.
    float m0 = neg_inf, m1 = neg_inf, l0 = 0.f, l1 = 0.f;
    // ldmatrix row addresses: lane l reads row l % 8 of matrix l / 8.
    const int mrow = lane & 7, mat = lane >> 3;

    for (int it = 0; it < tiles; ++it) {
        const int st = it & 1, j0 = it * ATT_K, kv_left = kv_end - j0;
        if (it + 1 < tiles) load_kv_tile<WARPS>(sm, st ^ 1, k, v, b, h, seq, w, j0 + ATT_K);
        cp_async_commit();
        cp_async_wait_all_but_one();
        __syncthreads();
        if (active) {
            // S = Q·Kᵀ for these 64 keys: 8 tiles of 8 keys; matrices 0-3 of one ldmatrix are
            // head dims 0-7, 8-15, 16-23, 24-31 (then 32-63) of the tile's 8 keys.
            float s[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
                if (nt * 8 < kv_left) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        unsigned kb[4];
                        ldmatrix_x4(kb, smem_addr(&sm.k[st][nt * 8 + mrow][half * 32 + mat * 8]));
                        mma16816<BF16>(s[nt], qa[2 * half], kb[0], kb[1]);
                        mma16816<BF16>(s[nt], qa[2 * half + 1], kb[2], kb[3]);
                    }
                }
            }
            // Scale and mask (keys past kv_end are masked too); the rows' maxima over the
            // quad's four threads.
            float mx0 = neg_inf, mx1 = neg_inf;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int j = j0 + nt * 8 + 2 * t + (e & 1);
                    int n = e < 2 ? n0 : n1;
                    s[nt][e] = j < n ? s[nt][e] * scale_log2 : neg_inf;
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
            // A row that has seen no key yet keeps a finite base, so that exp2() gives 0, not NaN.
            float base0 = new0 == neg_inf ? 0.f : new0, base1 = new1 == neg_inf ? 0.f : new1;
            float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                s[nt][0] = exp2f(s[nt][0] - base0);
                s[nt][1] = exp2f(s[nt][1] - base0);
                s[nt][2] = exp2f(s[nt][2] - base1);
                s[nt][3] = exp2f(s[nt][3] - base1);
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
            // Matrices 0-3 of one ldmatrix.trans: keys +0-7 and +8-15 of head dims 8·dp, then
            // the same keys of dims 8·dp + 8. Chunks of 16 keys past kv_end have P = 0: skipped.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                if (kk * 16 < kv_left) {
                    unsigned pa[4] = {pack2<BF16>(s[2 * kk][0], s[2 * kk][1]),
                                      pack2<BF16>(s[2 * kk][2], s[2 * kk][3]),
                                      pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                      pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                    for (int dp = 0; dp < 8; dp += 2) {
                        unsigned vb[4];
                        ldmatrix_x4_trans(vb, smem_addr(&sm.v[st][kk * 16 + (mat & 1) * 8 + mrow]
                                                             [(dp + (mat >> 1)) * 8]));
                        mma16816<BF16>(o[dp], pa, vb[0], vb[1]);
                        mma16816<BF16>(o[dp + 1], pa, vb[2], vb[3]);
                    }
                }
            }
        }
        // Every warp is done with stage `st` before the next iteration's copies refill it.
        __syncthreads();
    }

    if (!active) return;
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

// At most 128 registers, so that 4 blocks of 4 warps (or 2 of 8) share a multiprocessor:
// 16 warps either way.
#define FLASH_ENTRY(NAME, WARPS, BLOCKS, T, BF16)                                             \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, BLOCKS)                          \
        NAME(const T* q, const T* k, const T* v, T* out, int seq, int queries, int heads,     \
             float scale, int causal, const int* lengths) {                                   \
        flash_attention_impl<T, BF16, WARPS>(q, k, v, out, seq, queries, heads, scale, causal, \
                                             lengths);                                        \
    }
FLASH_ENTRY(flash_attention_bf16, 4, 4, bf16_t, true)
FLASH_ENTRY(flash_attention_f16, 4, 4, f16_t, false)
FLASH_ENTRY(flash_attention_wide_bf16, 8, 2, bf16_t, true)
FLASH_ENTRY(flash_attention_wide_f16, 8, 2, f16_t, false)
