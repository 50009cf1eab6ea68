// MLA decode over a paged latent cache, absorbed form. Cache: [blocks][64][R + P] (f32, bf16,
// or e4m3 codes with one f32 scale per token, value = code * scale). Query row (sequence b, head h): q_abs [R], q_pe [P]; score_t = scale * (q_abs.c_t +
// q_pe.kpe_t); out = sum_t softmax(score)_t c_t, [R]. One thread block per (head, sequence)
// with an online softmax over 64-token pages; latent dims spread over the threads.

#define MLA_BLOCK 64
#define MLA_THREADS 256
#define MLA_MAX_R 1024

template <typename T>
__device__ __forceinline__ float ld(const T* p, long long i);
template <>
__device__ __forceinline__ float ld<float>(const float* p, long long i) { return p[i]; }
template <>
__device__ __forceinline__ float ld<u16>(const u16* p, long long i) { return bf16_to_f32(p[i]); }
template <>
__device__ __forceinline__ float ld<u8>(const u8* p, long long i) { return e4m3_to_f32(p[i]); }

// Query row b reads page-table row b * table_stride: a prefill chunk passes stride 0 (every
// row attends over the same sequence) with per-row causal lengths.
template <typename T>
__device__ void mla_decode_impl(const T* __restrict__ cache, const float* __restrict__ tok_scale,
                                const int* __restrict__ page_table, int table_stride,
                                const int* __restrict__ seq_lens,
                                const float* __restrict__ q_abs, const float* __restrict__ q_pe,
                                float* __restrict__ out, int heads, int R, int P, float scale) {
    __shared__ float q[MLA_MAX_R + 128];
    __shared__ float p_tok[MLA_BLOCK];
    __shared__ float red[32];
    int h = blockIdx.x, b = blockIdx.y;
    long long row = (long long)b * heads + h;
    int E = R + P, len = seq_lens[b];
    for (int i = threadIdx.x; i < R; i += blockDim.x) q[i] = q_abs[row * R + i] * scale;
    for (int i = threadIdx.x; i < P; i += blockDim.x) q[R + i] = q_pe[row * P + i] * scale;
    __syncthreads();
    // Each thread owns latent dims threadIdx.x + j * blockDim.x (R <= 4 * MLA_THREADS).
    float o[4] = {0, 0, 0, 0};
    float m_run = NEG_INF, l_run = 0.0f;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int t0 = 0; t0 < len; t0 += MLA_BLOCK) {
        int tp = min(MLA_BLOCK, len - t0);
        long long page = page_table[(long long)b * table_stride + t0 / MLA_BLOCK];
        long long base = page * MLA_BLOCK * E;
        const float* ts = tok_scale ? tok_scale + page * MLA_BLOCK : nullptr;
        // Scores: one warp per token.
        for (int t = warp; t < tp; t += nw) {
            const T* c = cache + base + (long long)t * E;
            float s = 0.0f;
            for (int i = lane; i < E; i += 32) s += q[i] * ld<T>(c, i);
            s = warp_sum(s);
            if (lane == 0) p_tok[t] = ts ? s * ts[t] : s;
        }
        __syncthreads();
        float pm = NEG_INF;
        for (int t = 0; t < tp; ++t) pm = fmaxf(pm, p_tok[t]);
        float m_new = fmaxf(m_run, pm);
        float corr = __expf(m_run - m_new);
        l_run *= corr;
        for (int j = 0; j < 4; ++j) o[j] *= corr;
        for (int t = 0; t < tp; ++t) {
            float p = __expf(p_tok[t] - m_new);
            l_run += p;
            if (ts) p *= ts[t];
            const T* c = cache + base + (long long)t * E;
            for (int j = 0; j < 4; ++j) {
                int i = threadIdx.x + j * blockDim.x;
                if (i < R) o[j] += p * ld<T>(c, i);
            }
        }
        m_run = m_new;
        __syncthreads();
    }
    (void)red;
    float inv = 1.0f / l_run;
    for (int j = 0; j < 4; ++j) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < R) out[row * R + i] = o[j] * inv;
    }
}

// grid: (heads, batch), block: 256. page_table: [batch][table_stride] (or one shared row).
#define MLA_ARGS(T)                                                                           \
    const T *cache, const float *tok_scale, const int *page_table, int table_stride,         \
        const int *seq_lens, const float *q_abs, const float *q_pe, float *out, int heads,  \
        int R, int P, float scale
extern "C" __global__ void mla_decode_f32(MLA_ARGS(float)) {
    mla_decode_impl<float>(cache, nullptr, page_table, table_stride, seq_lens, q_abs, q_pe, out,
                           heads, R, P, scale);
}
extern "C" __global__ void mla_decode_bf16(MLA_ARGS(u16)) {
    mla_decode_impl<u16>(cache, nullptr, page_table, table_stride, seq_lens, q_abs, q_pe, out,
                         heads, R, P, scale);
}
extern "C" __global__ void mla_decode_fp8(MLA_ARGS(u8)) {
    mla_decode_impl<u8>(cache, tok_scale, page_table, table_stride, seq_lens, q_abs, q_pe, out,
                        heads, R, P, scale);
}

// ---- Tensor-core MLA decode over a bf16 cache (FlashMLA's approach on mma.sync) ----
// One CTA of 4 warps per (16 heads, query row, split of the row's tokens). The 16 heads' queries
// (scaled, bf16) and 16 tokens of cache at a time sit in shared memory: S = Q.C^T (16 x 16, K =
// rank + rope) is split over the warps by K and summed through shared memory, the online
// softmax runs on S in registers, and O += P.V (V = the first `rank` columns of C) has each warp
// own a quarter of the rank. Each split writes its unnormalised O with its max and sum;
// mla_combine_splits merges the splits. Constraints (checked by the host): rank % 32 == 0,
// (rank + rope) % 16 == 0, rank + rope <= 576.

#define MMA_MAX_E 576
#define MMA_ES (MMA_MAX_E + 8) // shared row stride (u16): keeps fragment loads conflict-free

__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// grid: (ceil(heads / 16), rows, splits), block: 128. Partial results: po [rows][splits][heads][R],
// pm / pl [rows][splits][heads].
extern "C" __global__ void __launch_bounds__(128)
    mla_decode_mma_bf16(const u16* __restrict__ cache, const int* __restrict__ page_table,
                        int table_stride, const int* __restrict__ seq_lens,
                        const float* __restrict__ q_abs, const float* __restrict__ q_pe,
                        float* __restrict__ po, float* __restrict__ pm, float* __restrict__ pl,
                        int heads, int R, int P, float scale) {
    __shared__ __align__(16) u16 Qs[16 * MMA_ES];
    __shared__ __align__(16) u16 Cs[16 * MMA_ES];
    __shared__ float Sred[4][16][17];
    const int E = R + P;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h0 = blockIdx.x * 16;
    const long long row = blockIdx.y;
    const int split = blockIdx.z, splits = gridDim.z;
    const int len = seq_lens[row];
    int per = (len + splits - 1) / splits;
    per = (per + 15) / 16 * 16;
    const int tb = split * per, te = min(len, tb + per);
    const long long part = (row * splits + split) * heads;
    // Queries of heads h0..h0+15, scaled, as bf16 (zero for heads past the end).
    for (int i = threadIdx.x; i < 16 * E; i += blockDim.x) {
        int h = i / E, c = i % E;
        float v = 0.0f;
        if (h0 + h < heads) {
            long long qr = row * heads + h0 + h;
            v = c < R ? q_abs[qr * R + c] : q_pe[qr * P + (c - R)];
        }
        Qs[h * MMA_ES + c] = f32_to_bf16(v * scale);
    }
    const int dims = R / 4;       // output dims of this warp
    const int nt = dims / 8;      // its n-tiles (at most 16)
    const int d0 = warp * dims;
    float o[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};
    const int ksteps = E / 16;
    for (int t0 = tb; t0 < te; t0 += 16) {
        __syncthreads();
        // 16 tokens of cache (zero past te), 16-byte chunks.
        const int cpr = E / 8; // uint4 per token row
        for (int i = threadIdx.x; i < 16 * cpr; i += blockDim.x) {
            int tok = i / cpr, c = i % cpr;
            int tt = t0 + tok;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (tt < te) {
                long long page = page_table[row * table_stride + tt / 64];
                const u16* src = cache + (page * 64 + tt % 64) * (long long)E;
                v = __ldg((const uint4*)src + c);
            }
            *(uint4*)(Cs + tok * MMA_ES + c * 8) = v;
        }
        __syncthreads();
        // S partial over this warp's K steps.
        float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        for (int ks = warp; ks < ksteps; ks += 4) {
            int k0 = ks * 16;
            u32 a[4];
            a[0] = *(const u32*)(Qs + g * MMA_ES + k0 + t * 2);
            a[1] = *(const u32*)(Qs + (g + 8) * MMA_ES + k0 + t * 2);
            a[2] = *(const u32*)(Qs + g * MMA_ES + k0 + 8 + t * 2);
            a[3] = *(const u32*)(Qs + (g + 8) * MMA_ES + k0 + 8 + t * 2);
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                u32 b0 = *(const u32*)(Cs + (n * 8 + g) * MMA_ES + k0 + t * 2);
                u32 b1 = *(const u32*)(Cs + (n * 8 + g) * MMA_ES + k0 + 8 + t * 2);
                mma_bf16(s[n], a, b0, b1);
            }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            Sred[warp][g][n * 8 + t * 2] = s[n][0];
            Sred[warp][g][n * 8 + t * 2 + 1] = s[n][1];
            Sred[warp][g + 8][n * 8 + t * 2] = s[n][2];
            Sred[warp][g + 8][n * 8 + t * 2 + 1] = s[n][3];
        }
        __syncthreads();
        // Full S in every warp (same sums in the same order), masked past te.
        float p[2][4];
        float cmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int r = g + (e >= 2 ? 8 : 0), c = n * 8 + t * 2 + (e & 1);
                float v = Sred[0][r][c] + Sred[1][r][c] + Sred[2][r][c] + Sred[3][r][c];
                if (t0 + c >= te) v = NEG_INF;
                p[n][e] = v;
                cmax[e >> 1] = fmaxf(cmax[e >> 1], v);
            }
        float corr[2], rsum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            cmax[i] = fmaxf(cmax[i], __shfl_xor_sync(0xffffffffu, cmax[i], 1));
            cmax[i] = fmaxf(cmax[i], __shfl_xor_sync(0xffffffffu, cmax[i], 2));
            float m_new = fmaxf(m_run[i], cmax[i]);
            corr[i] = __expf(m_run[i] - m_new);
            m_run[i] = m_new;
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = __expf(p[n][e] - m_run[e >> 1]);
                p[n][e] = v;
                rsum[e >> 1] += v;
            }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            rsum[i] += __shfl_xor_sync(0xffffffffu, rsum[i], 1);
            rsum[i] += __shfl_xor_sync(0xffffffffu, rsum[i], 2);
            l_run[i] = l_run[i] * corr[i] + rsum[i];
        }
        u32 a[4];
        a[0] = pack_bf16(p[0][0], p[0][1]);
        a[1] = pack_bf16(p[0][2], p[0][3]);
        a[2] = pack_bf16(p[1][0], p[1][1]);
        a[3] = pack_bf16(p[1][2], p[1][3]);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            if (j < nt) {
                o[j][0] *= corr[0];
                o[j][1] *= corr[0];
                o[j][2] *= corr[1];
                o[j][3] *= corr[1];
                int d = d0 + j * 8 + g;
                u32 b0 = (u32)Cs[(t * 2) * MMA_ES + d] | ((u32)Cs[(t * 2 + 1) * MMA_ES + d] << 16);
                u32 b1 = (u32)Cs[(t * 2 + 8) * MMA_ES + d] |
                         ((u32)Cs[(t * 2 + 9) * MMA_ES + d] << 16);
                mma_bf16(o[j], a, b0, b1);
            }
        }
    }
    // Unnormalised partial output, with the running max and sum of each head.
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        if (j < nt) {
            int d = d0 + j * 8 + t * 2;
            if (h0 + g < heads) {
                float* dst = po + (part + h0 + g) * R + d;
                dst[0] = o[j][0];
                dst[1] = o[j][1];
            }
            if (h0 + g + 8 < heads) {
                float* dst = po + (part + h0 + g + 8) * R + d;
                dst[0] = o[j][2];
                dst[1] = o[j][3];
            }
        }
    }
    if (warp == 0 && t == 0) {
        if (h0 + g < heads) {
            pm[part + h0 + g] = m_run[0];
            pl[part + h0 + g] = l_run[0];
        }
        if (h0 + g + 8 < heads) {
            pm[part + h0 + g + 8] = m_run[1];
            pl[part + h0 + g + 8] = l_run[1];
        }
    }
}

// out[row][h] = sum_s e^(m_s - M) po_s / sum_s e^(m_s - M) l_s. grid: (heads, rows), block: 128.
extern "C" __global__ void mla_combine_splits(const float* __restrict__ po,
                                              const float* __restrict__ pm,
                                              const float* __restrict__ pl, int splits,
                                              float* __restrict__ out, int heads, int R) {
    int h = blockIdx.x;
    long long row = blockIdx.y;
    float M = NEG_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, pm[(row * splits + s) * heads + h]);
    float L = 0.0f;
    for (int s = 0; s < splits; ++s) {
        long long i = (row * splits + s) * heads + h;
        if (pl[i] > 0.0f) L += __expf(pm[i] - M) * pl[i];
    }
    float inv = 1.0f / L;
    for (int c = threadIdx.x; c < R; c += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            long long i = (row * splits + s) * heads + h;
            if (pl[i] > 0.0f) acc += __expf(pm[i] - M) * po[i * R + c];
        }
        out[(row * heads + h) * R + c] = acc * inv;
    }
}
