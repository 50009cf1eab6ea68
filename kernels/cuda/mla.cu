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
