// y[M, N] = x[M, K] . W[N, K]^T with W in FP8 e4m3 (128x128 block scales), BF16 or F32, x f32.
// Epilogue: mode 0 stores; mode 1 accumulates y += row_scale[m] * (x.W^T) (row_scale may be
// null for 1). x and y carry row strides (ldx, ldy), so per-head projections read and write
// their columns of wider rows in place.
//
// Decode shapes (few rows) use gemv_*: one warp per output column n, the weight row streamed
// once in 16-byte loads, 4 loads in flight per lane, all of up to 8 rows of x against it
// (gridDim.y covers more rows). Bandwidth-bound: the weights are read once per 8 rows.
// Prefill shapes use block_gemm (64x64 tiles dequantised into shared memory, f32 FMA: exact
// f32 activations) or, on sm_89+, gemm_fp8_mma: activations quantised per (row, 128 columns) to
// e4m3 by quant_rows_fp8 (DeepSeek-V3's recipe), FP8 tensor-core mma with f32 accumulation,
// promoted with both block scales every 128 columns of K.

#define TM 64
#define TN 64
#define TK 32
#define GEMV_ROWS 8

__device__ __forceinline__ void epilogue(float* y, long long idx, float v, int mode,
                                         const float* row_scale, long long m) {
    if (mode == 0) {
        y[idx] = v;
    } else {
        float s = row_scale ? row_scale[m] : 1.0f;
        y[idx] += s * v;
    }
}

// Four e4m3 codes (little-endian in v) to f32, exactly: the code's magnitude bits shifted into
// an f32's exponent/mantissa give value * 2^-120 (normals and subnormals alike), so one
// multiply by 2^120 restores it; the sign bit moves to bit 31. NaN codes are never stored.
__device__ __forceinline__ void e4m3x4(u32 v, float* o) {
    const float k = 1.329227995784916e36f; // 2^120
    o[0] = __uint_as_float(((v & 0x80u) << 24) | ((v & 0x7fu) << 20)) * k;
    o[1] = __uint_as_float(((v & 0x8000u) << 16) | ((v & 0x7f00u) << 12)) * k;
    o[2] = __uint_as_float(((v & 0x800000u) << 8) | ((v & 0x7f0000u) << 4)) * k;
    o[3] = __uint_as_float((v & 0x80000000u) | ((v & 0x7f000000u) >> 4));
    o[3] *= k;
}

// 16 bytes of weights to f32: 16 fp8, 8 bf16 or 4 f32 values.
template <int KIND>
__device__ __forceinline__ void unpack16(uint4 r, float* o) {
    if (KIND == 0) {
        e4m3x4(r.x, o);
        e4m3x4(r.y, o + 4);
        e4m3x4(r.z, o + 8);
        e4m3x4(r.w, o + 12);
    } else if (KIND == 1) {
        u32 w[4] = {r.x, r.y, r.z, r.w};
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = __uint_as_float(w[i] << 16);
            o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
        o[0] = __uint_as_float(r.x);
        o[1] = __uint_as_float(r.y);
        o[2] = __uint_as_float(r.z);
        o[3] = __uint_as_float(r.w);
    }
}

#define GEMV_UNROLL 4

// grid: (ceil(N / 8), ceil(M / 8)), block: 256 = 8 warps, one output column per warp.
template <int KIND>
__device__ void gemv_impl(const float* __restrict__ x, long long ldx, const u8* __restrict__ w,
                          const float* __restrict__ scale_inv, float* __restrict__ y,
                          long long ldy, int M, int N, int K, int mode,
                          const float* __restrict__ row_scale) {
    constexpr int ES = KIND == 0 ? 1 : (KIND == 1 ? 2 : 4);
    constexpr int V = 16 / ES;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long long n = (long long)blockIdx.x * 8 + warp;
    if (n >= N) return;
    long long m0 = (long long)blockIdx.y * GEMV_ROWS;
    int mr = (int)min((long long)GEMV_ROWS, (long long)M - m0);
    const float* xb = x + m0 * ldx;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) acc[i] = 0.0f;
    long long kb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    const float* srow = KIND == 0 ? scale_inv + (n / FP8_BLOCK) * kb : nullptr;
    const u8* wr = w + n * (long long)K * ES;
    // x rows start 16-byte aligned (k0 is a multiple of 4 below): float4 loads.
    const bool xv = (ldx % 4 == 0) && (((unsigned long long)xb & 15ull) == 0);
    if (((long long)K * ES) % 16 == 0) {
        // Every row starts 16-byte aligned: whole 16-byte chunks, GEMV_UNROLL in flight.
        long long chunks = (long long)K / V;
        for (long long c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
            uint4 raw[GEMV_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                long long c = c0 + u * 32;
                raw[u] = c < chunks ? __ldg((const uint4*)(wr) + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                long long c = c0 + u * 32;
                if (c >= chunks) break;
                float wv[V];
                unpack16<KIND>(raw[u], wv);
                long long k0 = c * V;
                float s = KIND == 0 ? srow[k0 / FP8_BLOCK] : 1.0f;
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; ++i) {
                    if (i < mr) {
                        const float* xr = xb + i * ldx + k0;
                        float p = 0.0f;
                        if (xv) {
                            // 16-byte loads of x: a quarter of the load instructions.
#pragma unroll
                            for (int j = 0; j < V; j += 4) {
                                float4 q = __ldg((const float4*)(xr + j));
                                p += q.x * wv[j] + q.y * wv[j + 1] + q.z * wv[j + 2] +
                                     q.w * wv[j + 3];
                            }
                        } else {
#pragma unroll
                            for (int j = 0; j < V; ++j) p += xr[j] * wv[j];
                        }
                        acc[i] += p * s;
                    }
                }
            }
        }
    } else {
        for (long long k = lane; k < K; k += 32) {
            float wv = load_w(w, scale_inv, KIND, n, k, K);
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; ++i)
                if (i < mr) acc[i] += xb[i * ldx + k] * wv;
        }
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) {
        if (i >= mr) break;
        float v = warp_sum(acc[i]);
        if (lane == 0) epilogue(y, (m0 + i) * ldy + n, v, mode, row_scale, m0 + i);
    }
}

#define GEMV_ARGS                                                                            \
    const float *__restrict__ x, long long ldx, const u8 *__restrict__ w,                    \
        const float *__restrict__ scale_inv, float *__restrict__ y, long long ldy, int M,    \
        int N, int K, int mode, const float *__restrict__ row_scale

extern "C" __global__ void gemv_fp8(GEMV_ARGS) {
    gemv_impl<0>(x, ldx, w, scale_inv, y, ldy, M, N, K, mode, row_scale);
}
extern "C" __global__ void gemv_bf16(GEMV_ARGS) {
    gemv_impl<1>(x, ldx, w, scale_inv, y, ldy, M, N, K, mode, row_scale);
}
extern "C" __global__ void gemv_f32(GEMV_ARGS) {
    gemv_impl<2>(x, ldx, w, scale_inv, y, ldy, M, N, K, mode, row_scale);
}

// grid: (ceil(N / 64), ceil(M / 64)), block: 256 threads, each a 4x4 sub-tile.
extern "C" __global__ void block_gemm(const float* __restrict__ x, long long ldx,
                                      const void* __restrict__ w,
                                      const float* __restrict__ scale_inv, int kind,
                                      float* __restrict__ y, long long ldy, int M, int N, int K,
                                      int mode, const float* __restrict__ row_scale) {
    __shared__ float xs[TK][TM + 1];
    __shared__ float ws[TK][TN + 1];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    long long m0 = (long long)blockIdx.y * TM, n0 = (long long)blockIdx.x * TN;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (long long k0 = 0; k0 < K; k0 += TK) {
        for (int e = threadIdx.x; e < TM * TK; e += blockDim.x) {
            int r = e / TK, c = e % TK;
            long long gm = m0 + r, gk = k0 + c;
            xs[c][r] = (gm < M && gk < K) ? x[gm * ldx + gk] : 0.0f;
            long long gn = n0 + r;
            ws[c][r] = (gn < N && gk < K) ? load_w(w, scale_inv, kind, gn, gk, K) : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < TK; ++c) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[c][ty * 4 + i];
            for (int j = 0; j < 4; ++j) b[j] = ws[c][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        long long gm = m0 + ty * 4 + i;
        if (gm >= M) continue;
        for (int j = 0; j < 4; ++j) {
            long long gn = n0 + tx * 4 + j;
            if (gn < N) epilogue(y, gm * ldy + gn, acc[i][j], mode, row_scale, gm);
        }
    }
}

// f32 -> e4m3fn code, round to nearest even, saturating to +-448 (as kernels::fp8::f32_to_e4m3).
__device__ __forceinline__ u32 f32_to_e4m3(float f) {
    u32 b = __float_as_uint(f);
    u32 s = (b >> 24) & 0x80u;
    float a = fabsf(f);
    if (a != a) return 0x7fu;
    if (a >= 448.0f) return s | 0x7eu;
    if (a < 0.015625f) return s | (u32)rintf(a * 512.0f); // subnormal steps of 2^-9
    u32 ab = __float_as_uint(a);
    u32 r = ab + 0x7ffffu + ((ab >> 20) & 1u); // round the mantissa to 3 bits, ties to even
    int e = (int)((r >> 23) & 0xffu) - 127;
    u32 m = (r >> 20) & 7u;
    if (e > 8 || (e == 8 && m == 7)) return s | 0x7eu;
    return s | ((u32)(e + 7) << 3) | m;
}

// Quantises x [M, K] (row stride ldx) per (row, 128 columns): scale = amax / 448, codes into
// xq [M, ldq] (columns K..ldq zero), scales into xs [M, KB].
// grid: (KB, M), block: 128 (one thread per column of the block).
extern "C" __global__ void quant_rows_fp8(const float* __restrict__ x, long long ldx, int M,
                                          int K, u8* __restrict__ xq, long long ldq,
                                          float* __restrict__ xs) {
    __shared__ float red[32];
    long long m = blockIdx.y;
    int kb = blockIdx.x, KB = gridDim.x;
    long long k = (long long)kb * FP8_BLOCK + threadIdx.x;
    float v = k < K ? x[m * ldx + k] : 0.0f;
    float amax = block_max(fabsf(v), red);
    float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    if (k < ldq) xq[m * ldq + k] = (u8)(k < K ? f32_to_e4m3(v / scale) : 0u);
    if (threadIdx.x == 0) xs[m * KB + kb] = scale;
}

#define BM 128
#define BN 128
#define SROW 144 // shared row stride in bytes: 128 + 16 keeps fragment loads conflict-free

__device__ __forceinline__ void mma_e4m3(float* d, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap(); // the host only launches FP8 mma kernels on sm_89 and newer
#endif
}

// Loads a 128 x 128-byte tile (rows r0.., bytes k0..) of a row-major byte matrix with row
// stride ld into shared memory (row stride SROW), zero outside [rows, cols).
__device__ __forceinline__ void load_tile(u8* sm, const u8* __restrict__ g, long long ld,
                                          long long r0, long long rows, long long k0,
                                          long long cols) {
    bool vec = (ld % 16) == 0;
    for (int c = threadIdx.x; c < 128 * 8; c += blockDim.x) {
        int r = c >> 3, cc = (c & 7) * 16;
        long long gr = r0 + r, gk = k0 + cc;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (gr < rows) {
            const u8* src = g + gr * ld + gk;
            if (vec && gk + 16 <= cols) {
                v = __ldg((const uint4*)src);
            } else {
                u32 wds[4] = {0, 0, 0, 0};
                for (int i = 0; i < 16; ++i)
                    if (gk + i < cols) wds[i >> 2] |= (u32)src[i] << (8 * (i & 3));
                v = make_uint4(wds[0], wds[1], wds[2], wds[3]);
            }
        }
        *(uint4*)(sm + r * SROW + cc) = v;
    }
}

// y (+)= dequant(xq, xs) . dequant(W)^T. xq [M, ldq] e4m3 with scales xs [M, KB]; W [N, K]
// e4m3 with 128x128 scales. grid: (ceil(N / 128), ceil(M / 128)), block: 256 = 8 warps as
// 2 (M) x 4 (N), each warp 64 x 32 of the 128 x 128 tile.
extern "C" __global__ void __launch_bounds__(256)
    gemm_fp8_mma(const u8* __restrict__ xq, long long ldq, const float* __restrict__ xs,
                 const u8* __restrict__ w, const float* __restrict__ ws,
                 float* __restrict__ y, long long ldy, int M, int N, int K, int mode,
                 const float* __restrict__ row_scale) {
    __shared__ __align__(16) u8 As[BM * SROW];
    __shared__ __align__(16) u8 Bs[BN * SROW];
    __shared__ float a_sc[BM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int wm = warp >> 2, wn = warp & 3;
    int g = lane >> 2, t = lane & 3;
    long long m0 = (long long)blockIdx.y * BM, n0 = (long long)blockIdx.x * BN;
    int KB = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    for (int kb = 0; kb < KB; ++kb) {
        long long k0 = (long long)kb * FP8_BLOCK;
        load_tile(As, xq, ldq, m0, M, k0, K);
        load_tile(Bs, w, K, n0, N, k0, K);
        if (threadIdx.x < BM) {
            long long gm = m0 + threadIdx.x;
            a_sc[threadIdx.x] = gm < M ? xs[gm * KB + kb] : 0.0f;
        }
        __syncthreads();
        float part[4][4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) part[i][j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FP8_BLOCK; kk += 32) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                int r = wm * 64 + mi * 16 + g;
                a[mi][0] = *(const u32*)(As + r * SROW + kk + t * 4);
                a[mi][1] = *(const u32*)(As + (r + 8) * SROW + kk + t * 4);
                a[mi][2] = *(const u32*)(As + r * SROW + kk + 16 + t * 4);
                a[mi][3] = *(const u32*)(As + (r + 8) * SROW + kk + 16 + t * 4);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                int c = wn * 32 + ni * 8 + g;
                b[ni][0] = *(const u32*)(Bs + c * SROW + kk + t * 4);
                b[ni][1] = *(const u32*)(Bs + c * SROW + kk + 16 + t * 4);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_e4m3(part[mi][ni], a[mi], b[ni]);
        }
        // n0 is a multiple of 128: the whole tile shares one weight scale per K block.
        float wsc = ws[(n0 / FP8_BLOCK) * KB + kb];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            int r = wm * 64 + mi * 16 + g;
            float s0 = a_sc[r] * wsc, s1 = a_sc[r + 8] * wsc;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                acc[mi][ni][0] += part[mi][ni][0] * s0;
                acc[mi][ni][1] += part[mi][ni][1] * s0;
                acc[mi][ni][2] += part[mi][ni][2] * s1;
                acc[mi][ni][3] += part[mi][ni][3] * s1;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                long long gm = m0 + wm * 64 + mi * 16 + g + (e >= 2 ? 8 : 0);
                long long gn = n0 + wn * 32 + ni * 8 + t * 2 + (e & 1);
                if (gm < M && gn < N) epilogue(y, gm * ldy + gn, acc[mi][ni][e], mode, row_scale, gm);
            }
        }
    }
}

// Ceilings for `bench kernels --device cuda`: dense FP8 mma.sync and f32 FMA throughput on
// register operands (8 independent accumulator chains per warp, nothing read from memory).
// The result is stored only if impossible, so the work cannot be removed.
// grid: many blocks of 256; iters per thread.
extern "C" __global__ void fp8_mma_peak(float* out, int iters) {
    u32 a[4] = {0x38383838u, 0x30303030u, 0x38303830u, 0x30383038u}; // 1.0 and 0.25
    u32 b[2] = {0x38383838u, 0x30303030u};
    float d[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[j][e] = 0.0f;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) mma_e4m3(d[j], a, b);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
    if (s == -1.0f) out[blockIdx.x] = s;
}

extern "C" __global__ void fma_peak(float* out, int iters) {
    float x[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = (float)(threadIdx.x + j);
    const float a = 0.999f, c = 0.001f;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] = fmaf(x[j], a, c);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += x[j];
    if (s == -1.0f) out[blockIdx.x] = s;
}
