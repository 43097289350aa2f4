// BF16 GEMMs on tensor cores for the grouped expert GEMMs of the BF16 policy: the semantics of
// gemm.cu's gemm_bf16_mma (operands rounded to BF16 with RNE, exact products, f32 accumulation,
// optional BF16 rounding of the result and accumulation into C), restructured for throughput:
// - the operands are BF16 copies the host makes once per call (half the bytes of f32, and 16-byte
//   cp.async copies straight into shared memory with no conversion on the way);
// - 128 x 128 tiles of C per block of 8 warps (each warp 64 x 32), 64-deep k steps in a
//   three-stage cp.async pipeline (two steps in flight while the tensor cores work on a third);
// - fragments come from ldmatrix: plain for K-contiguous operands, .trans for operands stored
//   [K, rows] (Wgrad: tokens are K; Dgrad: the weight is [K, N]), so no layout needs a copy.
// Layout template parameters: AK = 1 when A is stored [M, K], 0 when [K, M]; BK = 1 when B is
// stored [N, K], 0 when [K, N]. K-contiguous operands need K % 8 == 0, [K, rows] ones rows % 8 == 0
// (16-byte pieces; the host checks).
// GEMM_PLAIN: C = A B. GEMM_SEGMENT_M: rows off[e]..off[e+1] of A and C use expert e's B (B holds E
// matrices of bRows x bCols). GEMM_SEGMENT_K: C[e] = A_e^T B_e where A_e and B_e are rows
// off[e]..off[e+1] of A [rows, M] and B [rows, N].

#define G16_BM 128
#define G16_BN 128
#define G16_BK 64
#define G16_STAGES 3
#define G16_LDK 72   // u16 per row of a K-contiguous tile: 64 k + 8 (ldmatrix rows hit distinct banks)
#define G16_LDR 136  // u16 per k-row of a [K, rows] tile: 128 rows + 8

// Shared u16 per stage and operand (the larger of the two layouts).
#define G16_TILE (G16_BM * G16_LDK > G16_BK * G16_LDR ? G16_BM * G16_LDK : G16_BK * G16_LDR)
// The dynamic shared memory a block needs (the host passes it at launch): both operands' stages.
#define G16_SMEM_BYTES 110592
static_assert(G16_SMEM_BYTES == 2 * G16_STAGES * G16_TILE * sizeof(u16), "G16_SMEM_BYTES is the stages' size");

// Starts the copy of one operand's 64-deep slice: rows r0.. (of `rows`), k0.. (of K). KC: stored
// [rows, K] with row stride ld; otherwise stored [K, rows] with row stride ld. 1024 pieces of 16
// bytes, 4 per thread.
template <int KC>
__device__ __forceinline__ void g16_load(u16* s, const u16* g, i64 ld, int rows, int K, int r0, int k0) {
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int i = threadIdx.x + j * 256;
    if (KC) {
      const int r = i >> 3, k = (i & 7) * 8;
      const bool in = r0 + r < rows && k0 + k < K;
      cp_async<16>(s + r * G16_LDK + k, in ? g + (i64)(r0 + r) * ld + k0 + k : g, in);
    } else {
      const int k = i >> 4, r = (i & 15) * 8;
      const bool in = k0 + k < K && r0 + r < rows;
      cp_async<16>(s + k * G16_LDR + r, in ? g + (i64)(k0 + k) * ld + r0 + r : g, in);
    }
  }
}

__device__ __forceinline__ void ldsm_x4(u32* r, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// One block's 128 x 128 tile of C = A B (M x N, inner K); A, B, C already offset to the matrix.
template <int AK, int BK>
__device__ __forceinline__ void g16_tile(const u16* A, i64 lda, const u16* B, i64 ldb, float* C, int M, int N, int K,
                                         int mTile, int nTile, int accumulate, int outBf16) {
  extern __shared__ __align__(16) u16 g16_smem[];
  u16* sA = g16_smem;
  u16* sB = g16_smem + G16_STAGES * G16_TILE;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int q = lane >> 3, j8 = lane & 7;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  const int m0 = mTile * G16_BM, n0 = nTile * G16_BN;
  const int steps = (K + G16_BK - 1) / G16_BK;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int jn = 0; jn < 4; jn++) acc[i][jn][0] = acc[i][jn][1] = acc[i][jn][2] = acc[i][jn][3] = 0.0f;
  auto load = [&](int stage, int step) {
    g16_load<AK>(sA + stage * G16_TILE, A, lda, M, K, m0, step * G16_BK);
    g16_load<BK>(sB + stage * G16_TILE, B, ldb, N, K, n0, step * G16_BK);
  };
#pragma unroll
  for (int s = 0; s < G16_STAGES - 1; s++) {
    if (s < steps) load(s, s);
    cp_commit();
  }
  for (int it = 0; it < steps; it++) {
    cp_wait<G16_STAGES - 2>();
    __syncthreads();  // this step's slice is in; every warp is done with the stage refilled next
    if (it + G16_STAGES - 1 < steps) load((it + G16_STAGES - 1) % G16_STAGES, it + G16_STAGES - 1);
    cp_commit();
    const u16* a = sA + (it % G16_STAGES) * G16_TILE;
    const u16* b = sB + (it % G16_STAGES) * G16_TILE;
#pragma unroll
    for (int kk = 0; kk < G16_BK; kk += 16) {
      u32 af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int m = wm + i * 16;
        if (AK) ldsm_x4(af[i], a + (m + j8 + 8 * (q & 1)) * G16_LDK + kk + 8 * (q >> 1));
        else ldsm_x4_t(af[i], a + (kk + j8 + 8 * (q >> 1)) * G16_LDR + m + 8 * (q & 1));
      }
#pragma unroll
      for (int jp = 0; jp < 2; jp++) {
        const int n = wn + jp * 16;
        u32 r[4];
        if (BK) ldsm_x4(r, b + (n + j8 + 8 * (q >> 1)) * G16_LDK + kk + 8 * (q & 1));
        else ldsm_x4_t(r, b + (kk + j8 + 8 * (q & 1)) * G16_LDR + n + 8 * (q >> 1));
        bf[2 * jp][0] = r[0], bf[2 * jp][1] = r[1], bf[2 * jp + 1][0] = r[2], bf[2 * jp + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int jn = 0; jn < 4; jn++) mma_bf16(acc[i][jn], af[i], bf[jn][0], bf[jn][1]);
    }
  }
  cp_wait<0>();
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int m = m0 + wm + i * 16 + g + 8 * h;
      if (m >= M) continue;
#pragma unroll
      for (int jn = 0; jn < 4; jn++) {
        const int n = n0 + wn + jn * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; e++) {
          if (n + e >= N) continue;
          float v = acc[i][jn][2 * h + e];
          if (outBf16) v = round_bf16(v);
          float* c = C + (i64)m * N + n + e;
          *c = accumulate ? *c + v : v;
        }
      }
    }
}

template <int AK, int BK>
__device__ __forceinline__ void g16_dispatch(const u16* A, const u16* B, float* C, int M, int N, int K, int mode,
                                             const int* off, int E, int bRows, int bCols, int accumulate,
                                             int outBf16) {
  if (mode == GEMM_PLAIN) {
    g16_tile<AK, BK>(A, AK ? K : M, B, BK ? K : N, C, M, N, K, blockIdx.y, blockIdx.x, accumulate, outBf16);
    return;
  }
  if (mode == GEMM_SEGMENT_M) {
    // This block's expert, and its tile within the expert's rows.
    int tile = blockIdx.y, e = 0;
    for (; e < E; e++) {
      const int tiles = (off[e + 1] - off[e] + G16_BM - 1) / G16_BM;
      if (tile < tiles) break;
      tile -= tiles;
    }
    if (e >= E) return;
    const int rows = off[e + 1] - off[e];
    g16_tile<AK, BK>(A + (i64)off[e] * K, K, B + (i64)e * bRows * bCols, bCols, C + (i64)off[e] * N, rows, N, K,
                     tile, blockIdx.x, accumulate, outBf16);
    return;
  }
  // GEMM_SEGMENT_K
  const int e = blockIdx.z;
  g16_tile<AK, BK>(A + (i64)off[e] * M, M, B + (i64)off[e] * N, N, C + (i64)e * M * N, M, N, off[e + 1] - off[e],
                   blockIdx.y, blockIdx.x, accumulate, outBf16);
}

#define GEMM16(AK, BK)                                                                                   \
  KERNEL void __launch_bounds__(256, 2) gemm_bf16_tc_##AK##BK(                                            \
      const u16* A, const u16* B, float* C, int M, int N, int K, int mode, const int* off, int E, int bRows, \
      int bCols, int accumulate, int outBf16) {                                                           \
    g16_dispatch<AK, BK>(A, B, C, M, N, K, mode, off, E, bRows, bCols, accumulate, outBf16);             \
  }

GEMM16(1, 1)  // Fprop: x [M, K], W [N, K]
GEMM16(1, 0)  // Dgrad: dy [M, K], W [K, N]
GEMM16(0, 0)  // Wgrad: dy [K, M], x [K, N]
GEMM16(0, 1)
