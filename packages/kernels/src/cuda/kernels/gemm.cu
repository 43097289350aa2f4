// Tiled GEMMs for what cuBLASLt does not take: f32/BF16 and FP8 with any group layout and shape,
// plain or grouped over expert segments whose offsets stay on the device (docs/runtime.md rule 2).
// C[M,N] (+)= op(A) op(B). The FP8 path computes exactly the reference's chunked promotion
// (fp8-core scaledMatmul): within each `promotion`-long stretch of K the products of decoded FP8
// values are summed in f32, then the partial sum is scaled by the two groups' scales and added to
// an f32 accumulator (or each product is scaled first when the stretch spans several groups).
//
// Modes (common.cuh): GEMM_PLAIN; GEMM_SEGMENT_M (rows of A split by expert, B holds E matrices);
// GEMM_SEGMENT_K (the reduction runs over each expert's rows of A^T and B, C holds E matrices of M x N).
// Operand layouts: aKcols = 1 when K runs along the stored columns of A (A stored [M,K]), 0 when
// A is stored [K,M]; bKcols = 1 when B is stored [N,K], 0 when [K,N].

#define BM 64
#define BN 64
#define BK 16

// Every entry point below is one instantiation of gemm_dispatch over these named choices (its
// static_asserts reject the combinations no tile implements); the tile routines branch on them with
// `if constexpr`.

// What the operands hold: f32 values (rounded to BF16 on load when the run-time inBf16 flag asks),
// f32 values always rounded to BF16 (the tensor-core BF16 GEMM), or FP8 codes with group scales.
enum class Operands { F32, Bf16, Fp8 };

// What multiplies: the CUDA cores (f32 FMAs; FP8 with any promotion interval) or the tensor cores
// (mma.sync; FP8 promoted every 128 elements of K).
enum class Unit { Simt, Mma };

// How A and B are stored: each operand's layout given at run time (aKcols, bKcols), or both in one
// layout fixed at compile time: K-contiguous ("tn": A [M,K], B [N,K]) or K-outer ("tt": A [K,M],
// B [K,N]).
enum class Layout { PerOperand, KInner, KOuter };

// An FP8 operand's format fixed at compile time, or Runtime: read from the fa/fb arguments (and the
// value for f32 and BF16 operands, which have none).
enum class Fp8Format { Runtime, E4M3, E5M2 };

template <Operands IN>
__device__ __forceinline__ float load_elem(const void* p, i64 idx, int fmt, int inBf16) {
  if constexpr (IN == Operands::Fp8) return decode_fp8(((const u8*)p)[idx], fmt);
  const float v = ((const float*)p)[idx];
  return inBf16 ? round_bf16(v) : v;
}

// The CUDA-core tile: 256 threads, each a 4 x 4 block of the 64 x 64 tile of C.
template <Operands IN>
__device__ __forceinline__ void gemm_tile(
    const void* A, const float* As, int ga, int fa, int aKcols,
    const void* B, const float* Bs, int gb, int fb, int bKcols,
    float* C, int M, int N, int K, int mTile, int nTile,
    int accumulate, int outBf16, int inBf16, int promotion) {
  __shared__ float sa[BK][BM];
  __shared__ float sb[BK][BN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int m0 = mTile * BM, n0 = nTile * BN;
  float acc[4][4], part[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = part[i][j] = 0.0f;
  const int chunk = min(promotion, max(K, 1));
  const bool whole = (ga == G_ROW || ga == G_TENSOR) && (gb == G_ROW || gb == G_TENSOR);
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int l = threadIdx.x; l < BK * BM; l += 256) {
      int kk, mm;
      if (aKcols) { kk = l % BK; mm = l / BK; } else { mm = l % BM; kk = l / BM; }
      const int m = m0 + mm, k = k0 + kk;
      float v = 0.0f;
      if (m < M && k < K) v = load_elem<IN>(A, aKcols ? (i64)m * K + k : (i64)k * M + m, fa, inBf16);
      sa[kk][mm] = v;
    }
    for (int l = threadIdx.x; l < BK * BN; l += 256) {
      int kk, nn;
      if (bKcols) { kk = l % BK; nn = l / BK; } else { nn = l % BN; kk = l / BN; }
      const int n = n0 + nn, k = k0 + kk;
      float v = 0.0f;
      if (n < N && k < K) v = load_elem<IN>(B, bKcols ? (i64)n * K + k : (i64)k * N + n, fb, inBf16);
      sb[kk][nn] = v;
    }
    __syncthreads();
    const int kend = min(BK, K - k0);
    for (int kk = 0; kk < kend; kk++) {
      const int k = k0 + kk;
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = sa[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = sb[kk][tx + 16 * j];
      if constexpr (IN != Operands::Fp8) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
          for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        continue;
      }
      const int cs = (k / chunk) * chunk;
      const int ce = min(cs + chunk, K);
      const bool factored = whole || (cs / 128 == (ce - 1) / 128);
      if (factored) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
          for (int j = 0; j < 4; j++) part[i][j] = __fadd_rn(part[i][j], __fmul_rn(av[i], bv[j]));
      } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int m = min(m0 + ty + 16 * i, M - 1);
          const float s1 = As[aKcols ? scale_index(ga, m, k, M, K) : scale_index(ga, k, m, K, M)];
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const int n = min(n0 + tx + 16 * j, N - 1);
            const float s2 = Bs[bKcols ? scale_index(gb, n, k, N, K) : scale_index(gb, k, n, K, N)];
            part[i][j] = __fadd_rn(part[i][j], __fmul_rn(__fmul_rn(__fmul_rn(av[i], bv[j]), s1), s2));
          }
        }
      }
      if (k == ce - 1) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int m = min(m0 + ty + 16 * i, M - 1);
          const float s1 = factored ? As[aKcols ? scale_index(ga, m, cs, M, K) : scale_index(ga, cs, m, K, M)] : 1.0f;
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const int n = min(n0 + tx + 16 * j, N - 1);
            if (factored) {
              const float s2 = Bs[bKcols ? scale_index(gb, n, cs, N, K) : scale_index(gb, cs, n, K, N)];
              acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(__fmul_rn(part[i][j], s1), s2));
            } else {
              acc[i][j] = __fadd_rn(acc[i][j], part[i][j]);
            }
            part[i][j] = 0.0f;
          }
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      float v = acc[i][j];
      if (outBf16) v = round_bf16(v);
      float* c = C + (i64)m * N + n;
      *c = accumulate ? *c + v : v;
    }
  }
}


// --- FP8 on tensor cores ----------------------------------------------------------------------
// mma.sync m16n8k32 with 8-bit inputs and f32 accumulation (PTX ISA fragment layouts, g = lane/4,
// t = lane%4): A regs {row g, k 4t..4t+3}, {row g+8, k 4t..}, {row g, k 4t+16..}, {row g+8, k 4t+16..};
// B regs {k 4t..4t+3, n g}, {k 4t+16.., n g}; C {row g, n 2t, 2t+1}, {row g+8, n 2t, 2t+1}.
// Promotion as DeepSeek-V3 and DeepGEMM do it: each 128-long stretch of K is summed by the tensor
// cores into a fresh f32 partial, which is then scaled by the two operands' group scales and added
// to the f32 accumulator, exactly the factored branch of gemm_tile (summation order aside).
template <Fp8Format FA, Fp8Format FB>
__device__ __forceinline__ void mma_fp8_t(float* c, const u32* a, u32 b0, u32 b1) {
  static_assert(FA != Fp8Format::Runtime && FB != Fp8Format::Runtime, "mma.sync needs both formats");
#define MMA8T(TA, TB)                                                                                    \
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32." TA "." TB                                       \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                             \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  constexpr bool a4 = FA == Fp8Format::E4M3, b4 = FB == Fp8Format::E4M3;
  if constexpr (a4 && b4) MMA8T("e4m3", "e4m3");
  else if constexpr (a4) MMA8T("e4m3", "e5m2");
  else if constexpr (b4) MMA8T("e5m2", "e4m3");
  else MMA8T("e5m2", "e5m2");
#undef MMA8T
}

// The same with the formats known only at run time (fa, fb: FMT_E4M3 or FMT_E5M2; the tile kernel
// for any layout).
__device__ __forceinline__ void mma_fp8(float* c, const u32* a, u32 b0, u32 b1, int fa, int fb) {
  constexpr Fp8Format E4 = Fp8Format::E4M3, E5 = Fp8Format::E5M2;
  if (fa == FMT_E4M3 && fb == FMT_E4M3) mma_fp8_t<E4, E4>(c, a, b0, b1);
  else if (fa == FMT_E4M3) mma_fp8_t<E4, E5>(c, a, b0, b1);
  else if (fb == FMT_E4M3) mma_fp8_t<E5, E4>(c, a, b0, b1);
  else mma_fp8_t<E5, E5>(c, a, b0, b1);
}

// A warp's MMA fragments from shared [row][k] tiles of LD bytes per row, k-step at byte column k:
// two m16 tiles of A (rows wm..wm+31) and four n8 tiles of B (rows wn..wn+31). An FP8 m16n8k32
// fragment and a BF16 m16n8k16 one have the same byte layout (4 bytes per register, the second
// half 16 bytes on), so both the FP8 and the BF16 tiles load through this.
template <int LD>
__device__ __forceinline__ void mma_frags(u32 (*af)[4], u32 (*bf)[2], const u8* sa, const u8* sb, int wm, int wn, int k) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const u8* p = sa + (wm + i * 16 + g) * LD + k + 4 * t;
    af[i][0] = *(const u32*)p;
    af[i][1] = *(const u32*)(p + 8 * LD);
    af[i][2] = *(const u32*)(p + 16);
    af[i][3] = *(const u32*)(p + 8 * LD + 16);
  }
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const u8* p = sb + (wn + j * 8 + g) * LD + k + 4 * t;
    bf[j][0] = *(const u32*)p;
    bf[j][1] = *(const u32*)(p + 16);
  }
}

__device__ __forceinline__ void zero_frag_acc(float (*c)[4][4]) {
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) c[i][j][e] = 0.0f;
}

// The group scales of the promotion chunk starting at k0 for a warp's rows r0.. of A (s1, by m16
// tile and half) and columns c0.. of B (s2, by n8 tile and column pair). aK / bK: operand stored
// K-contiguous ([rows, K]) rather than [K, rows].
__device__ __forceinline__ void chunk_scales(float (*s1)[2], float (*s2)[2], const float* As, int ga, int aK,
                                             const float* Bs, int gb, int bK, int M, int N, int K, int r0, int c0,
                                             int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int m = min(r0 + i * 16 + g + 8 * h, M - 1);
      s1[i][h] = As[aK ? scale_index(ga, m, k0, M, K) : scale_index(ga, k0, m, K, M)];
    }
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int n = min(c0 + j * 8 + 2 * t + e, N - 1);
      s2[j][e] = Bs[bK ? scale_index(gb, n, k0, N, K) : scale_index(gb, k0, n, K, N)];
    }
}

// The promotion: acc += (part * s1) * s2, in the reference's order of roundings.
__device__ __forceinline__ void promote(float (*acc)[4][4], const float (*part)[4][4], const float (*s1)[2],
                                        const float (*s2)[2]) {
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        acc[i][j][e] = __fadd_rn(acc[i][j][e], __fmul_rn(__fmul_rn(part[i][j][e], s1[i][e >> 1]), s2[j][e & 1]));
}

#define MMA_LD 48  // bytes per row of a shared tile: 32 k-bytes, padded so fragment loads miss no bank

// s[r][k] = the 64 x 32 tile of rows r0.. and k0.. of an FP8 operand with `rows` rows and K
// columns, stored [rows, K] (kcols = 1) or [K, rows] (kcols = 0); zero bytes (+0) outside.
__device__ __forceinline__ void mma_load_tile(u8* s, const u8* g, int kcols, int rows, int K, int r0, int k0) {
  const int i = threadIdx.x;
  if (kcols) {
    const int r = i >> 1, kk = (i & 1) * 16, row = r0 + r, k = k0 + kk;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < rows && (K & 15) == 0 && k + 16 <= K) {
      v = *(const uint4*)(g + (i64)row * K + k);
    } else if (row < rows) {
      u8 b[16];
#pragma unroll
      for (int j = 0; j < 16; j++) b[j] = k + j < K ? g[(i64)row * K + k + j] : 0;
      v = *(const uint4*)b;
    }
    *(uint4*)(s + r * MMA_LD + kk) = v;
    return;
  }
  const int kk = i >> 2, rs = (i & 3) * 16, k = k0 + kk, row = r0 + rs;
  u8 b[16];
  if (k < K && (rows & 15) == 0 && row + 16 <= rows) {
    *(uint4*)b = *(const uint4*)(g + (i64)k * rows + row);
  } else {
#pragma unroll
    for (int j = 0; j < 16; j++) b[j] = (k < K && row + j < rows) ? g[(i64)k * rows + row + j] : 0;
  }
#pragma unroll
  for (int j = 0; j < 16; j++) s[(rs + j) * MMA_LD + kk] = b[j];
}

// A warp's 32 x 32 block of C from its m16n8 accumulators (rows r0.., columns c0..).
__device__ __forceinline__ void mma_store(float* C, int M, int N, int r0, int c0, const float (*acc)[4][4],
                                          int accumulate, int outBf16) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int m = r0 + i * 16 + g + 8 * (e >> 1), n = c0 + j * 8 + 2 * t + (e & 1);
        if (m >= M || n >= N) continue;
        float v = acc[i][j][e];
        if (outBf16) v = round_bf16(v);
        float* c = C + (i64)m * N + n;
        *c = accumulate ? *c + v : v;
      }
}

#define MMA_LD16 40  // u16 per row of a BF16 shared tile: 32 k-values, padded likewise

// The BF16 version of mma_load_tile: f32 operand, rounded to BF16 (RNE) on the way in.
__device__ __forceinline__ void mma_load_tile16(u16* s, const float* g, int kcols, int rows, int K, int r0, int k0) {
  const int i = threadIdx.x;
  float v[16];
  if (kcols) {
    const int r = i >> 1, kk = (i & 1) * 16, row = r0 + r, k = k0 + kk;
    if (row < rows && (K & 3) == 0 && k + 16 <= K) {
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float4 t = *(const float4*)(g + (i64)row * K + k + 4 * j);
        v[4 * j] = t.x, v[4 * j + 1] = t.y, v[4 * j + 2] = t.z, v[4 * j + 3] = t.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < 16; j++) v[j] = (row < rows && k + j < K) ? g[(i64)row * K + k + j] : 0.0f;
    }
    u32 w[8];
#pragma unroll
    for (int j = 0; j < 8; j++) w[j] = pack_bf16(v[2 * j], v[2 * j + 1]);
    *(uint4*)(s + r * MMA_LD16 + kk) = make_uint4(w[0], w[1], w[2], w[3]);
    *(uint4*)(s + r * MMA_LD16 + kk + 8) = make_uint4(w[4], w[5], w[6], w[7]);
    return;
  }
  const int kk = i >> 2, rs = (i & 3) * 16, k = k0 + kk, row = r0 + rs;
  if (k < K && (rows & 3) == 0 && row + 16 <= rows) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float4 t = *(const float4*)(g + (i64)k * rows + row + 4 * j);
      v[4 * j] = t.x, v[4 * j + 1] = t.y, v[4 * j + 2] = t.z, v[4 * j + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; j++) v[j] = (k < K && row + j < rows) ? g[(i64)k * rows + row + j] : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < 16; j++) s[(rs + j) * MMA_LD16 + kk] = f32_to_bf16(v[j]);
}

// BF16 x BF16 -> f32 on tensor cores (m16n8k16), the gemm_f32 semantics with inBf16 = 1: operands
// rounded to BF16, products exact, f32 accumulation (order aside). Same 64 x 64 tiles and warps.
__device__ __forceinline__ void gemm_tile_bf16_mma(
    const float* A, int aKcols, const float* B, int bKcols,
    float* C, int M, int N, int K, int mTile, int nTile, int accumulate, int outBf16) {
  __shared__ __align__(16) u16 sa[BM * MMA_LD16];
  __shared__ __align__(16) u16 sb[BN * MMA_LD16];
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int m0 = mTile * BM, n0 = nTile * BN;
  float acc[2][4][4];
  zero_frag_acc(acc);
  for (int k0 = 0; k0 < K; k0 += 32) {
    mma_load_tile16(sa, A, aKcols, M, K, m0, k0);
    mma_load_tile16(sb, B, bKcols, N, K, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {
      u32 af[2][4], bf[4][2];
      mma_frags<MMA_LD16 * 2>(af, bf, (const u8*)sa, (const u8*)sb, wm, wn, kk * 2);
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) mma_bf16(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
    __syncthreads();
  }
  mma_store(C, M, N, m0 + wm, n0 + wn, acc, accumulate, outBf16);
}

__device__ __forceinline__ void gemm_tile_mma(
    const u8* A, const float* As, int ga, int fa, int aKcols,
    const u8* B, const float* Bs, int gb, int fb, int bKcols,
    float* C, int M, int N, int K, int mTile, int nTile, int accumulate, int outBf16) {
  __shared__ __align__(16) u8 sa[BM * MMA_LD];
  __shared__ __align__(16) u8 sb[BN * MMA_LD];
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int m0 = mTile * BM, n0 = nTile * BN;
  float acc[2][4][4], part[2][4][4];
  zero_frag_acc(acc);
  zero_frag_acc(part);
  for (int k0 = 0; k0 < K; k0 += 32) {
    mma_load_tile(sa, A, aKcols, M, K, m0, k0);
    mma_load_tile(sb, B, bKcols, N, K, n0, k0);
    __syncthreads();
    u32 af[2][4], bf[4][2];
    mma_frags<MMA_LD>(af, bf, sa, sb, wm, wn, 0);
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int j = 0; j < 4; j++) mma_fp8(part[i][j], af[i], bf[j][0], bf[j][1], fa, fb);
    __syncthreads();
    const int kn = k0 + 32;
    if ((kn & 127) != 0 && kn < K) continue;
    float s1[2][2], s2[4][2];
    chunk_scales(s1, s2, As, ga, aKcols, Bs, gb, bKcols, M, N, K, m0 + wm, n0 + wn, k0 & ~127);
    promote(acc, part, s1, s2);
    zero_frag_acc(part);
  }
  mma_store(C, M, N, m0 + wm, n0 + wn, acc, accumulate, outBf16);
}


// --- FP8, both operands K-contiguous ("TN"), the fast path ----------------------------------------
// A [M, K] and B [N, K] with K a multiple of 16: each stage holds one whole 128-long promotion chunk
// of both 64-row tiles (16-byte loads), the next chunk is fetched into registers while the tensor
// cores work on this one (two shared buffers, one barrier per chunk), and the formats are template
// parameters. Same arithmetic as gemm_tile_mma.
#define TN_LD 144  // bytes per shared row: 128 k-bytes + 16 (fragment loads hit 32 distinct banks)


// One stage of an operand: 64 rows (r0..) x 128 k (k0..), 4 sixteen-byte pieces per thread.
// KInner: stored [rows, K] (K-contiguous); each piece is 16 k of one row.
// KOuter: stored [K, rows] (Wgrad: tokens are K), rows % 16 == 0; thread (k-quad q, 16-row chunk c)
// loads rows 16c..16c+15 of k = 4q..4q+3.
template <Layout L>
__device__ __forceinline__ void tn_fetch(uint4* r, const u8* g, int rows, int K, int r0, int k0) {
  static_assert(L != Layout::PerOperand, "a stage has one layout");
#pragma unroll
  for (int j = 0; j < 4; j++) {
    if constexpr (L == Layout::KInner) {
      const int idx = threadIdx.x + 128 * j, row = r0 + (idx >> 3), k = k0 + (idx & 7) * 16;
      r[j] = (row < rows && k < K) ? *(const uint4*)(g + (i64)row * K + k) : make_uint4(0, 0, 0, 0);
    } else {
      const int row = r0 + 16 * (threadIdx.x & 3), k = k0 + 4 * (threadIdx.x >> 2) + j;
      r[j] = (row < rows && k < K) ? *(const uint4*)(g + (i64)k * rows + row) : make_uint4(0, 0, 0, 0);
    }
  }
}

// 4 x 4 byte transpose: out[i] = byte i of a, b, c, d (one row's 4 consecutive k).
__device__ __forceinline__ void bytes4x4(u32 a, u32 b, u32 c, u32 d, u32* out) {
  const u32 lab = __byte_perm(a, b, 0x5140), hab = __byte_perm(a, b, 0x7362);
  const u32 lcd = __byte_perm(c, d, 0x5140), hcd = __byte_perm(c, d, 0x7362);
  out[0] = __byte_perm(lab, lcd, 0x5410);
  out[1] = __byte_perm(lab, lcd, 0x7632);
  out[2] = __byte_perm(hab, hcd, 0x5410);
  out[3] = __byte_perm(hab, hcd, 0x7632);
}

// The stage into shared memory as [row][k] (k-contiguous rows of TN_LD bytes).
template <Layout L>
__device__ __forceinline__ void tn_stash(u8* s, const uint4* r) {
  static_assert(L != Layout::PerOperand, "a stage has one layout");
  if constexpr (L == Layout::KInner) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int idx = threadIdx.x + 128 * j;
      *(uint4*)(s + (idx >> 3) * TN_LD + (idx & 7) * 16) = r[j];
    }
  } else {
    const int q = threadIdx.x >> 2, c = threadIdx.x & 3;
    u32 w[16];
    bytes4x4(r[0].x, r[1].x, r[2].x, r[3].x, w);
    bytes4x4(r[0].y, r[1].y, r[2].y, r[3].y, w + 4);
    bytes4x4(r[0].z, r[1].z, r[2].z, r[3].z, w + 8);
    bytes4x4(r[0].w, r[1].w, r[2].w, r[3].w, w + 12);
#pragma unroll
    for (int m = 0; m < 16; m++) *(u32*)(s + (16 * c + m) * TN_LD + 4 * q) = w[m];
  }
}

template <Fp8Format FA, Fp8Format FB, Layout L>
__device__ __forceinline__ void gemm_tile_tn(const u8* A, const float* As, int ga, const u8* B, const float* Bs, int gb,
                                             float* C, int M, int N, int K, int mTile, int nTile, int accumulate,
                                             int outBf16) {
  __shared__ __align__(16) u8 sa[2][BM * TN_LD];
  __shared__ __align__(16) u8 sb[2][BN * TN_LD];
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int m0 = mTile * BM, n0 = nTile * BN;
  float acc[2][4][4];
  zero_frag_acc(acc);
  uint4 ra[4], rb[4];
  tn_fetch<L>(ra, A, M, K, m0, 0);
  tn_fetch<L>(rb, B, N, K, n0, 0);
  tn_stash<L>(sa[0], ra);
  tn_stash<L>(sb[0], rb);
  __syncthreads();
  int st = 0;
  for (int k0 = 0; k0 < K; k0 += 128, st ^= 1) {
    const bool more = k0 + 128 < K;
    if (more) {
      tn_fetch<L>(ra, A, M, K, m0, k0 + 128);
      tn_fetch<L>(rb, B, N, K, n0, k0 + 128);
    }
    float s1[2][2], s2[4][2];  // loaded before the MMAs, so their latency hides behind them
    constexpr int kc = L == Layout::KInner;  // both operands K-contiguous
    chunk_scales(s1, s2, As, ga, kc, Bs, gb, kc, M, N, K, m0 + wm, n0 + wn, k0);
    float part[2][4][4];
    zero_frag_acc(part);
#pragma unroll
    for (int ks = 0; ks < 128; ks += 32) {
      u32 af[2][4], bf[4][2];
      mma_frags<TN_LD>(af, bf, sa[st], sb[st], wm, wn, ks);
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) mma_fp8_t<FA, FB>(part[i][j], af[i], bf[j][0], bf[j][1]);
    }
    promote(acc, part, s1, s2);
    if (more) {
      tn_stash<L>(sa[st ^ 1], ra);
      tn_stash<L>(sb[st ^ 1], rb);
    }
    __syncthreads();
  }
  mma_store(C, M, N, m0 + wm, n0 + wn, acc, accumulate, outBf16);
}

// One 64 x 64 tile of C with the routine of the chosen kind.
template <Operands IN, Unit UNIT, Layout L, Fp8Format FA, Fp8Format FB>
__device__ __forceinline__ void tile_any(
    const void* A, const float* As, int ga, int fa, int aKcols,
    const void* B, const float* Bs, int gb, int fb, int bKcols,
    float* C, int M, int N, int K, int mTile, int nTile,
    int accumulate, int outBf16, int inBf16, int promotion) {
  if constexpr (L != Layout::PerOperand)
    gemm_tile_tn<FA, FB, L>((const u8*)A, As, ga, (const u8*)B, Bs, gb, C, M, N, K, mTile, nTile, accumulate,
                            outBf16);
  else if constexpr (UNIT == Unit::Mma && IN == Operands::Fp8)
    gemm_tile_mma((const u8*)A, As, ga, fa, aKcols, (const u8*)B, Bs, gb, fb, bKcols, C, M, N, K, mTile, nTile,
                  accumulate, outBf16);
  else if constexpr (UNIT == Unit::Mma)
    gemm_tile_bf16_mma((const float*)A, aKcols, (const float*)B, bKcols, C, M, N, K, mTile, nTile, accumulate,
                       outBf16);
  else
    gemm_tile<IN>(A, As, ga, fa, aKcols, B, Bs, gb, fb, bKcols, C, M, N, K, mTile, nTile, accumulate, outBf16,
                  inBf16, promotion);
}

// The tile of C this block computes, plain (GEMM_PLAIN) or within an expert segment (GEMM_SEGMENT_M, _K),
// with the tile routine of the kind IN / UNIT / L / FA / FB.
template <Operands IN, Unit UNIT, Layout L = Layout::PerOperand, Fp8Format FA = Fp8Format::Runtime,
          Fp8Format FB = Fp8Format::Runtime>
__device__ __forceinline__ void gemm_dispatch(
    const void* A, const float* As, int ga, int fa, int aKcols,
    const void* B, const float* Bs, int gb, int fb, int bKcols,
    float* C, int M, int N, int K, int mode, const int* off, int E, int bRows, int bCols,
    int accumulate, int outBf16, int inBf16, int promotion) {
  static_assert(IN != Operands::F32 || UNIT == Unit::Simt,
                "f32 operands run on the CUDA cores (the tensor-core tile takes them as Operands::Bf16)");
  static_assert(IN != Operands::Bf16 || UNIT == Unit::Mma,
                "the CUDA-core tile rounds f32 operands to BF16 at run time (Operands::F32 and inBf16)");
  static_assert(L == Layout::PerOperand || (IN == Operands::Fp8 && UNIT == Unit::Mma),
                "only the FP8 tensor-core tile has fixed-layout variants");
  static_assert((L == Layout::PerOperand) == (FA == Fp8Format::Runtime && FB == Fp8Format::Runtime),
                "the fixed-layout tiles fix both formats; the others read them at run time (fa, fb)");
  constexpr int esz = IN == Operands::Fp8 ? 1 : 4;  // bytes per stored element of A and B
  if (mode == GEMM_PLAIN) {
    tile_any<IN, UNIT, L, FA, FB>(A, As, ga, fa, aKcols, B, Bs, gb, fb, bKcols, C, M, N, K, blockIdx.y, blockIdx.x,
                                  accumulate, outBf16, inBf16, promotion);
    return;
  }
  if (mode == GEMM_SEGMENT_M) {
    // Find this block's expert and its tile within the expert's rows.
    int t = blockIdx.y, e = 0;
    for (; e < E; e++) {
      const int tiles = cdiv(off[e + 1] - off[e], BM);
      if (t < tiles) break;
      t -= tiles;
    }
    if (e >= E) return;
    const int rows = off[e + 1] - off[e];
    const char* a = (const char*)A + (i64)off[e] * K * esz;
    const float* as = As ? As + (ga == G_TENSOR ? 0 : (i64)off[e] * scale_count(ga, 1, K)) : As;
    const char* b = (const char*)B + (i64)e * bRows * bCols * esz;
    const float* bs = Bs ? Bs + (i64)e * scale_count(gb, bRows, bCols) : Bs;
    tile_any<IN, UNIT, L, FA, FB>(a, as, ga, fa, 1, b, bs, gb, fb, bKcols, C + (i64)off[e] * N, rows, N, K, t,
                                  blockIdx.x, accumulate, outBf16, inBf16, promotion);
    return;
  }
  // GEMM_SEGMENT_K: C[e] = A_e^T B_e.
  const int e = blockIdx.z;
  const int rows = off[e + 1] - off[e];
  i64 aso = 0, bso = 0;
  for (int j = 0; j < e; j++) {
    const int r = off[j + 1] - off[j];
    if (ga != G_TENSOR) aso += scale_count(ga, r, M);
    if (gb != G_TENSOR) bso += scale_count(gb, r, N);
  }
  const char* a = (const char*)A + (i64)off[e] * M * esz;
  const char* b = (const char*)B + (i64)off[e] * N * esz;
  tile_any<IN, UNIT, L, FA, FB>(a, As ? As + aso : As, ga, fa, 0, b, Bs ? Bs + bso : Bs, gb, fb, 0,
                                C + (i64)e * M * N, M, N, rows, blockIdx.y, blockIdx.x, accumulate, outBf16, inBf16,
                                promotion);
}

KERNEL void __launch_bounds__(256) gemm_f32(
    const float* A, int aKcols, const float* B, int bKcols, float* C, int M, int N, int K,
    int mode, const int* off, int E, int bRows, int bCols, int accumulate, int outBf16, int inBf16) {
  gemm_dispatch<Operands::F32, Unit::Simt>(A, 0, 0, 0, aKcols, B, 0, 0, 0, bKcols, C, M, N, K, mode, off, E, bRows,
                                           bCols, accumulate, outBf16, inBf16, 1 << 30);
}

KERNEL void __launch_bounds__(256) gemm_fp8(
    const u8* A, const float* As, int ga, int fa, int aKcols,
    const u8* B, const float* Bs, int gb, int fb, int bKcols, float* C, int M, int N, int K,
    int mode, const int* off, int E, int bRows, int bCols, int accumulate, int outBf16, int promotion) {
  gemm_dispatch<Operands::Fp8, Unit::Simt>(A, As, ga, fa, aKcols, B, Bs, gb, fb, bKcols, C, M, N, K, mode, off, E,
                                           bRows, bCols, accumulate, outBf16, 0, promotion);
}

// The same GEMMs on tensor cores when the promotion interval is 128 (the recipe's): 128 threads.
KERNEL void __launch_bounds__(128) gemm_fp8_mma(
    const u8* A, const float* As, int ga, int fa, int aKcols,
    const u8* B, const float* Bs, int gb, int fb, int bKcols, float* C, int M, int N, int K,
    int mode, const int* off, int E, int bRows, int bCols, int accumulate, int outBf16) {
  gemm_dispatch<Operands::Fp8, Unit::Mma>(A, As, ga, fa, aKcols, B, Bs, gb, fb, bKcols, C, M, N, K, mode, off, E,
                                          bRows, bCols, accumulate, outBf16, 0, 128);
}

// BF16 GEMMs (f32 storage, inBf16 = 1) on tensor cores: 128 threads.
KERNEL void __launch_bounds__(128) gemm_bf16_mma(
    const float* A, int aKcols, const float* B, int bKcols, float* C, int M, int N, int K,
    int mode, const int* off, int E, int bRows, int bCols, int accumulate, int outBf16) {
  gemm_dispatch<Operands::Bf16, Unit::Mma>(A, 0, 0, 0, aKcols, B, 0, 0, 0, bKcols, C, M, N, K, mode, off, E, bRows,
                                          bCols, accumulate, outBf16, 1, 1 << 30);
}

// FP8 tensor-core GEMMs with both operands in one layout (gemm_tile_tn), one entry point per layout
// and pair of formats, 128 threads. KInner, "tn": both K-contiguous and K % 16 == 0 (Fprop and, with
// transposed weights, Dgrad of the experts). KOuter, "tt": both stored [K, rows] (Wgrad: the tokens
// are K; rows % 16 == 0), expert segments along K (GEMM_SEGMENT_K) or one matrix (GEMM_PLAIN). The
// aKcols and bKcols passed on say the same as L (the fixed-layout tile does not read them).
#define GEMM_FP8_LAYOUT(NAME, L, FA, FB)                                                                    \
  KERNEL void __launch_bounds__(128) NAME(const u8* A, const float* As, int ga, const u8* B, const float* Bs, \
                                          int gb, float* C, int M, int N, int K, int mode, const int* off,   \
                                          int E, int bRows, int bCols, int accumulate, int outBf16) {        \
    constexpr int kc = Layout::L == Layout::KInner;                                                         \
    gemm_dispatch<Operands::Fp8, Unit::Mma, Layout::L, Fp8Format::FA, Fp8Format::FB>(                       \
        A, As, ga, 0, kc, B, Bs, gb, 0, kc, C, M, N, K, mode, off, E, bRows, bCols, accumulate, outBf16, 0, 128); \
  }
GEMM_FP8_LAYOUT(gemm_fp8_tn_e4m3_e4m3, KInner, E4M3, E4M3)
GEMM_FP8_LAYOUT(gemm_fp8_tn_e4m3_e5m2, KInner, E4M3, E5M2)
GEMM_FP8_LAYOUT(gemm_fp8_tn_e5m2_e4m3, KInner, E5M2, E4M3)
GEMM_FP8_LAYOUT(gemm_fp8_tn_e5m2_e5m2, KInner, E5M2, E5M2)
GEMM_FP8_LAYOUT(gemm_fp8_tt_e4m3_e4m3, KOuter, E4M3, E4M3)
GEMM_FP8_LAYOUT(gemm_fp8_tt_e4m3_e5m2, KOuter, E4M3, E5M2)
GEMM_FP8_LAYOUT(gemm_fp8_tt_e5m2_e4m3, KOuter, E5M2, E4M3)
GEMM_FP8_LAYOUT(gemm_fp8_tt_e5m2_e5m2, KOuter, E5M2, E5M2)
