// Token assembly: patchify, vision tokens, text tokens and row gathers. One thread per output
// element (grid-stride). CPU twins: `CpuBackend::{patchify, vision_tokens, text_tokens,
// gather_rows}`; indices (token ids, rows) are checked on the host before the launch.
// `*_to_f32_*`: the tokens start the residual stream, kept in f32 with bf16 / f16 storage.
#include "common.cuh"

#define SETAR_GRID_STRIDE(i, n)                                                               \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);             \
         i += (long long)gridDim.x * blockDim.x)

// pixels [batch, channels, size, size] → out [batch·grid², channels·patch²], each patch in
// (channel, row, column) order; grid = size / patch (a ragged edge is dropped, as a strided
// conv does).
template <typename T>
__device__ __forceinline__ void patchify_impl(const T* px, T* out, int batch, int channels,
                                              int size, int patch) {
    int grid = size / patch;
    long long row = (long long)channels * patch * patch;
    long long n = (long long)batch * grid * grid * row;
    SETAR_GRID_STRIDE(o, n) {
        long long col = o % row;
        long long p = o / row;
        long long b = p / (grid * grid);
        int g = (int)(p % (grid * grid));
        int gy = g / grid, gx = g % grid;
        int c = (int)(col / (patch * patch));
        int rem = (int)(col % (patch * patch));
        int py = rem / patch, pxx = rem % patch;
        long long src = ((b * channels + c) * size + (long long)(gy * patch + py)) * size +
                        gx * patch + pxx;
        out[o] = px[src];
    }
}

// patches [batch·(tokens−1), dim] → out [batch·tokens, dim]: class embedding first, then the
// patches, each plus its position embedding.
template <typename T, typename TO>
__device__ __forceinline__ void vision_tokens_impl(const T* patches, const T* cls, const T* pos,
                                                   TO* out, int batch, int tokens, int dim) {
    long long n = (long long)batch * tokens * dim;
    SETAR_GRID_STRIDE(o, n) {
        int d = (int)(o % dim);
        long long bt = o / dim;
        int t = (int)(bt % tokens);
        long long b = bt / tokens;
        float v = t == 0 ? to_float(cls[d])
                         : to_float(patches[(b * (tokens - 1) + (t - 1)) * dim + d]);
        out[o] = from_float<TO>(v + to_float(pos[(long long)t * dim + d]));
    }
}

// ids [rows] (rows = batch·seq) → out [rows, dim] = table[id] + pos[row % seq].
template <typename T, typename TO>
__device__ __forceinline__ void text_tokens_impl(const unsigned int* ids, const T* table,
                                                 const T* pos, TO* out, long long rows, int seq,
                                                 int dim) {
    long long n = rows * dim;
    SETAR_GRID_STRIDE(o, n) {
        int d = (int)(o % dim);
        long long r = o / dim;
        int t = (int)(r % seq);
        float v = to_float(table[(long long)ids[r] * dim + d]) +
                  to_float(pos[(long long)t * dim + d]);
        out[o] = from_float<TO>(v);
    }
}

// out [n, dim] = x[rows[i], :] for i < n. Rows that are whole 16-byte words (CLIP's widths in
// every dtype) are copied a warp per row, 16 bytes per lane, with no division per element.
template <typename T>
__device__ __forceinline__ void gather_rows_impl(const T* x, const long long* rows, T* out,
                                                 long long n, int dim) {
    const long long bytes = (long long)dim * sizeof(T);
    if (bytes % 16 == 0 && (unsigned long long)x % 16 == 0 && (unsigned long long)out % 16 == 0) {
        const int words = (int)(bytes / 16), lane = threadIdx.x & 31;
        const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
        const uint4* xv = (const uint4*)x;
        uint4* ov = (uint4*)out;
        for (long long i = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n;
             i += warps) {
            const uint4* src = xv + rows[i] * words;
            uint4* dst = ov + i * words;
            for (int c = lane; c < words; c += 32) dst[c] = src[c];
        }
        return;
    }
    long long total = n * dim;
    SETAR_GRID_STRIDE(o, total) {
        long long i = o / dim;
        int d = (int)(o % dim);
        out[o] = x[rows[i] * dim + d];
    }
}

#define EMBED(T, S)                                                                           \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        patchify_##S(const T* px, T* out, int batch, int channels, int size, int patch) {     \
        patchify_impl<T>(px, out, batch, channels, size, patch);                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        vision_tokens_##S(const T* patches, const T* cls, const T* pos, T* out, int batch,    \
                          int tokens, int dim) {                                              \
        vision_tokens_impl<T, T>(patches, cls, pos, out, batch, tokens, dim);                 \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        vision_tokens_to_f32_##S(const T* patches, const T* cls, const T* pos, float* out,    \
                                 int batch, int tokens, int dim) {                            \
        vision_tokens_impl<T, float>(patches, cls, pos, out, batch, tokens, dim);             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        text_tokens_##S(const unsigned int* ids, const T* table, const T* pos, T* out,        \
                        long long rows, int seq, int dim) {                                   \
        text_tokens_impl<T, T>(ids, table, pos, out, rows, seq, dim);                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        text_tokens_to_f32_##S(const unsigned int* ids, const T* table, const T* pos,         \
                               float* out, long long rows, int seq, int dim) {                \
        text_tokens_impl<T, float>(ids, table, pos, out, rows, seq, dim);                     \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(SETAR_BLOCK)                                 \
        gather_rows_##S(const T* x, const long long* rows, T* out, long long n, int dim) {    \
        gather_rows_impl<T>(x, rows, out, n, dim);                                            \
    }
SETAR_FOR_EACH_TYPE(EMBED)
