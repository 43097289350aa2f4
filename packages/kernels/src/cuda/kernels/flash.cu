// Causal attention on tensor cores for the BF16 attention core (FlashAttention-2): the reference
// is attention.cu (and packages/tensor/src/ts/nn.ts), same math: q, k, v, dO and the probabilities
// P are BF16, every dot product accumulates in f32 (mma.sync m16n8k16 bf16 -> f32), lse and D stay
// f32, dS is rounded to BF16 before the GEMMs and the softmax scale is applied to dq/dk afterwards
// (it is linear, and not a power of two). One rounding point differs from the reference, as in
// FlashAttention-2: the forward makes one pass with an online softmax, so the P fed to P @ V is
// bf16(exp(s - running max)) and the row sum divides the f32 result (the reference rounds the
// normalised P); the backward recomputes P = exp(s - lse) exactly as the reference does.
// Inputs are BF16 copies (the host casts them once per call), so tiles stream into shared memory
// with cp.async, double-buffered: the next key (or query) tile loads while this one is multiplied.
// Nothing of size T x T is stored, nor any transposed tile (ldmatrix.trans reads B^T fragments).
// Layouts as attention.cu: q, k [B*T, H*DQK]; v, o, dO [B*T, H*DV]; lse, D [B*H*T].
// Grid: x = tile of 64 queries (forward, dq) or 64 keys (dk/dv), y = b*H + h; 4 warps of 16 rows.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, g = lane / 4, t = lane % 4): A regs {row g, k 2t},
// {row g+8, k 2t}, {row g, k 2t+8}, {row g+8, k 2t+8}; B regs {k 2t, n g}, {k 2t+8, n g};
// C {row g, n 2t, 2t+1}, {row g+8, n 2t, 2t+1}. Two C tiles side by side are one A fragment of the
// next GEMM (how P and dS feed P @ V, dS @ K, P^T @ dO and dS^T @ Q without shared memory).

#define FROWS 64
// Softmax in base 2 (exp2f is one MUFU instruction, expf a longer exact sequence that dominated
// the kernels): s * scale * log2(e) and lse * log2(e); lse is stored in natural log as the API says.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ u32 lds32(const u16* p) { return *(const u32*)p; }

// Starts copying rows [r0, r0 + R) x D of g (BF16, row stride ld) to s (row stride LD); rows at or
// past rmax become zeros. 16-byte pieces: D % 8 == 0 and 16-byte aligned rows (the host checks).
template <int R, int D, int LD>
__device__ __forceinline__ void tile_async(u16* s, const u16* g, i64 ld, int r0, int rmax) {
  constexpr int C = D / 8;
  for (int i = threadIdx.x; i < R * C; i += 128) {
    const int r = i / C, c = (i % C) * 8;
    const bool in = r0 + r < rmax;
    cp_async<16>(s + r * LD + c, g + (in ? (i64)(r0 + r) * ld : 0) + c, in);
  }
}

// A fragments of rows r and r + 8 (16 x D, BF16) straight from global memory.
template <int D>
__device__ __forceinline__ void frags_global(u32 (*a)[4], const u16* g, i64 ld, int r, int T) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int row = r + 8 * h;
      const bool in = row < T;
      a[ks][h] = in ? *(const u32*)(g + (i64)row * ld + ks * 16 + 2 * t) : 0u;
      a[ks][2 + h] = in ? *(const u32*)(g + (i64)row * ld + ks * 16 + 8 + 2 * t) : 0u;
    }
  }
}

// acc[NT][4] += A (16 x 16*KS, registers) @ B where B^T is in shared memory row-major: row n of B^T
// (column n of B) at s + n * LD, the k-th element at + k.
template <int KS, int NT, int LD>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const u32 (*a)[4], const u16* s) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      const u16* p = s + (nt * 8 + g) * LD + ks * 16 + 2 * t;
      mma_bf16(acc[nt], a[ks], lds32(p), lds32(p + 8));
    }
  }
}

// acc[NT][4] += A (16 x 16, registers) @ B with B[k][n] = s[k * LD + n] row-major in shared memory
// (16 rows of k from s): ldmatrix.trans hands each lane B's column pairs, so no transposed copy of
// V, K, Q or dO is ever stored. NT even; rows of LD u16 are 16-byte aligned.
template <int NT, int LD>
__device__ __forceinline__ void mma_rows_t(float (*acc)[4], const u32* a, const u16* s) {
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  const u32 base = smem_addr(s + ((lane & 7) + 8 * (mat & 1)) * LD + 8 * (mat >> 1));
#pragma unroll
  for (int nt = 0; nt < NT; nt += 2) {
    u32 b0, b1, b2, b3;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                 : "r"(base + nt * 16));
    mma_bf16(acc[nt], a, b0, b1);
    mma_bf16(acc[nt + 1], a, b2, b3);
  }
}

// The A fragment for k-step kk made of C tiles 2kk and 2kk+1 (rounded to BF16).
__device__ __forceinline__ void c_to_a(u32* a, const float (*c)[4], int kk) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <int N>
__device__ __forceinline__ void zero(float (*c)[4]) {
#pragma unroll
  for (int i = 0; i < N; i++) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
}

// Rows r and r + 8 of a C accumulator (times mul[h] for row r + 8h) to global memory.
template <int NT>
__device__ __forceinline__ void store_rows(float* g, i64 ld, int r, int T, const float (*c)[4], const float* mul) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int row = r + 8 * h;
    if (row >= T) continue;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
      *(float2*)(g + (i64)row * ld + nt * 8 + 2 * t) = make_float2(c[nt][2 * h] * mul[h], c[nt][2 * h + 1] * mul[h]);
  }
}

// The key/value pipeline of the forward and dq kernels (two stages): kv_first starts loading key
// tile 0; kv_next waits for tile `it` (stage it & 1) and starts tile it + 1 into the other stage.
template <int BK, int DQK, int DV>
__device__ __forceinline__ void kv_first(u16 (*sK)[BK * (DQK + 8)], u16 (*sV)[BK * (DV + 8)], const u16* kb,
                                         const u16* vb, i64 ldq, i64 ldv, int T) {
  tile_async<BK, DQK, DQK + 8>(sK[0], kb, ldq, 0, T);
  tile_async<BK, DV, DV + 8>(sV[0], vb, ldv, 0, T);
  cp_commit();
}
template <int BK, int DQK, int DV>
__device__ __forceinline__ void kv_next(u16 (*sK)[BK * (DQK + 8)], u16 (*sV)[BK * (DV + 8)], const u16* kb,
                                        const u16* vb, i64 ldq, i64 ldv, int it, int tiles, int T) {
  if (it + 1 < tiles) {
    tile_async<BK, DQK, DQK + 8>(sK[(it & 1) ^ 1], kb, ldq, (it + 1) * BK, T);
    tile_async<BK, DV, DV + 8>(sV[(it & 1) ^ 1], vb, ldv, (it + 1) * BK, T);
    cp_commit();
    cp_wait<1>();
  } else {
    cp_wait<0>();
  }
  __syncthreads();
}

// Key (or query) tile rows per pipeline stage: 64, or 32 when two stages of 64 would not fit the
// 48 KB of static shared memory (head sizes 128/128).
template <int DQK, int DV>
struct FlashTile {
  static constexpr int ROWS = 2 * 64 * (DQK + 8 + DV + 8) * 2 > 48 * 1024 ? 32 : 64;
};

// The (batch, head) pair a block works on (blockIdx.y = b * H + h): the row strides of q/k and
// v/o, the offsets of the pair's first row in them, and of its first row in lse and D.
template <int DQK, int DV>
struct FlashHead {
  i64 ldq, ldv, qk, vo, rows;
  __device__ __forceinline__ FlashHead(int T, int H) {
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    ldq = (i64)H * DQK;
    ldv = (i64)H * DV;
    qk = (i64)b * T * ldq + h * DQK;
    vo = (i64)b * T * ldv + h * DV;
    rows = (i64)bh * T;
  }
};

template <int DQK, int DV>
__device__ __forceinline__ void flash_fwd(const u16* q, const u16* k, const u16* v, float* o, float* lse,
                                          int T, int H, float scale) {
  constexpr int BK = FlashTile<DQK, DV>::ROWS, LK = DQK + 8, LV = DV + 8;
  __shared__ __align__(16) u16 sK[2][BK * LK];
  __shared__ __align__(16) u16 sV[2][BK * LV];
  const FlashHead<DQK, DV> hd(T, H);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * FROWS, r = q0 + (threadIdx.x >> 5) * 16 + g;
  const float scale2 = scale * LOG2E;
  const u16* kb = k + hd.qk;
  const u16* vb = v + hd.vo;
  const int kend = min(q0 + FROWS, T), tiles = (kend + BK - 1) / BK;
  kv_first<BK, DQK, DV>(sK, sV, kb, vb, hd.ldq, hd.ldv, T);
  u32 qa[DQK / 16][4];
  frags_global<DQK>(qa, q + hd.qk, hd.ldq, r, T);
  // Online softmax: running row max m (base 2, scaled) and per-thread partial sums l of
  // exp2(s - m) for rows r and r + 8; acc is rescaled whenever m grows.
  float m[2] = {-f32_inf(), -f32_inf()}, l[2] = {0.0f, 0.0f};
  float acc[DV / 8][4], s[BK / 8][4];
  zero<DV / 8>(acc);
  for (int it = 0; it < tiles; it++) {
    const int cur = it & 1, k0 = it * BK;
    kv_next<BK, DQK, DV>(sK, sV, kb, vb, hd.ldq, hd.ldv, it, tiles, T);
    zero<BK / 8>(s);
    mma_rows<DQK / 16, BK / 8, LK>(s, qa, sK[cur]);
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      float mx = -f32_inf();
#pragma unroll
      for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int key = k0 + nt * 8 + 2 * t + e;
          const float x = (key <= r + 8 * hh && key < T) ? s[nt][2 * hh + e] * scale2 : -f32_inf();
          s[nt][2 * hh + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m[hh], mx);
      // A row with no visible key yet (only rows past T, whose results are never stored) keeps
      // m = -inf; 0 stands in so that exp2 gives 0 rather than NaN.
      const float base = mn == -f32_inf() ? 0.0f : mn;
      const float alpha = exp2f(m[hh] - base);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < BK / 8; nt++) {
        s[nt][2 * hh] = exp2f(s[nt][2 * hh] - base);
        s[nt][2 * hh + 1] = exp2f(s[nt][2 * hh + 1] - base);
        sum += s[nt][2 * hh] + s[nt][2 * hh + 1];
      }
      l[hh] = l[hh] * alpha + sum;
      m[hh] = mn;
#pragma unroll
      for (int nt = 0; nt < DV / 8; nt++) acc[nt][2 * hh] *= alpha, acc[nt][2 * hh + 1] *= alpha;
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      u32 pa[4];
      c_to_a(pa, s, kk);
      mma_rows_t<DV / 8, LV>(acc, pa, sV[cur] + kk * 16 * LV);
    }
    __syncthreads();  // every warp is done with this stage before the next prefetch overwrites it
  }
  float inv[2];
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    float sum = l[hh];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[hh] = 1.0f / sum;
    if (t == 0 && r + 8 * hh < T) lse[hd.rows + r + 8 * hh] = (m[hh] + log2f(sum)) * LN2;
  }
  store_rows<DV / 8>(o + hd.vo, hd.ldv, r, T, acc, inv);
}

// dq = scale * sum_keys bf16(P (dP - D)) k, per tile of 64 queries; key tiles of 32.
template <int DQK, int DV>
__device__ __forceinline__ void flash_bwd_dq(const u16* dO, const u16* q, const u16* k, const u16* v,
                                             const float* lse, const float* D, float* dq, int T, int H, float scale) {
  constexpr int BK = 32, LK = DQK + 8, LV = DV + 8;
  __shared__ __align__(16) u16 sK[2][BK * LK];
  __shared__ __align__(16) u16 sV[2][BK * LV];
  const FlashHead<DQK, DV> hd(T, H);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * FROWS, r = q0 + (threadIdx.x >> 5) * 16 + g;
  const float scale2 = scale * LOG2E;
  const u16* kb = k + hd.qk;
  const u16* vb = v + hd.vo;
  const int kend = min(q0 + FROWS, T), tiles = (kend + BK - 1) / BK;
  kv_first<BK, DQK, DV>(sK, sV, kb, vb, hd.ldq, hd.ldv, T);
  u32 qa[DQK / 16][4], da[DV / 16][4];
  frags_global<DQK>(qa, q + hd.qk, hd.ldq, r, T);
  frags_global<DV>(da, dO + hd.vo, hd.ldv, r, T);
  float L[2], Dr[2];
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const bool in = r + 8 * hh < T;
    L[hh] = in ? lse[hd.rows + r + 8 * hh] * LOG2E : 0.0f;
    Dr[hh] = in ? D[hd.rows + r + 8 * hh] : 0.0f;
  }
  float acc[DQK / 8][4], s[BK / 8][4], dp[BK / 8][4];
  zero<DQK / 8>(acc);
  for (int it = 0; it < tiles; it++) {
    const int cur = it & 1, k0 = it * BK;
    kv_next<BK, DQK, DV>(sK, sV, kb, vb, hd.ldq, hd.ldv, it, tiles, T);
    zero<BK / 8>(s);
    zero<BK / 8>(dp);
    mma_rows<DQK / 16, BK / 8, LK>(s, qa, sK[cur]);
    mma_rows<DV / 16, BK / 8, LV>(dp, da, sV[cur]);
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + nt * 8 + 2 * t + (e & 1), row = r + 8 * (e >> 1);
        const float P = (key <= row && key < T) ? exp2f(s[nt][e] * scale2 - L[e >> 1]) : 0.0f;
        s[nt][e] = P * (dp[nt][e] - Dr[e >> 1]);
      }
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      u32 a[4];
      c_to_a(a, s, kk);
      mma_rows_t<DQK / 8, LK>(acc, a, sK[cur] + kk * 16 * LK);
    }
    __syncthreads();
  }
  const float mul[2] = {scale, scale};
  store_rows<DQK / 8>(dq + hd.qk, hd.ldq, r, T, acc, mul);
}

// dk = scale * sum_queries bf16(P (dP - D))^T q and dv = sum_queries bf16(P)^T dO, per tile of 64
// keys (a warp's 16 keys are the rows of the transposed products); query tiles of 32.
template <int DQK, int DV>
__device__ __forceinline__ void flash_bwd_dkdv(const u16* dO, const u16* q, const u16* k, const u16* v,
                                               const float* lse, const float* D, float* dk, float* dv, int T, int H,
                                               float scale) {
  constexpr int BQ = 32, LQ = DQK + 8, LO = DV + 8;
  __shared__ __align__(16) u16 sQ[2][BQ * LQ];
  __shared__ __align__(16) u16 sO[2][BQ * LO];
  __shared__ float sL[2][BQ], sD[2][BQ];
  const FlashHead<DQK, DV> hd(T, H);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int k0 = blockIdx.x * FROWS, r = k0 + (threadIdx.x >> 5) * 16 + g;
  const float scale2 = scale * LOG2E;
  const u16* qb = q + hd.qk;
  const u16* ob = dO + hd.vo;
  const float* lb = lse + hd.rows;
  const float* db = D + hd.rows;
  // Query tiles from the first one that sees key k0 (queries before it are masked) to the end.
  const int first = k0 / BQ, tiles = (T + BQ - 1) / BQ - first;
  auto load = [&](int stage, int q0) {
    tile_async<BQ, DQK, LQ>(sQ[stage], qb, hd.ldq, q0, T);
    tile_async<BQ, DV, LO>(sO[stage], ob, hd.ldv, q0, T);
    if (threadIdx.x < BQ) {
      const int i = q0 + threadIdx.x;
      cp_async<4>(&sL[stage][threadIdx.x], lb + (i < T ? i : 0), i < T);
      cp_async<4>(&sD[stage][threadIdx.x], db + (i < T ? i : 0), i < T);
    }
    cp_commit();
  };
  if (tiles > 0) load(0, first * BQ);
  u32 ka[DQK / 16][4], va[DV / 16][4];
  frags_global<DQK>(ka, k + hd.qk, hd.ldq, r, T);
  frags_global<DV>(va, v + hd.vo, hd.ldv, r, T);
  float ak[DQK / 8][4], av[DV / 8][4], s[BQ / 8][4], dp[BQ / 8][4];
  zero<DQK / 8>(ak);
  zero<DV / 8>(av);
  for (int it = 0; it < tiles; it++) {
    const int cur = it & 1, q0 = (first + it) * BQ;
    if (it + 1 < tiles) {
      load(cur ^ 1, q0 + BQ);
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    zero<BQ / 8>(s);
    zero<BQ / 8>(dp);
    mma_rows<DQK / 16, BQ / 8, LQ>(s, ka, sQ[cur]);  // S^T = K Q^T
    mma_rows<DV / 16, BQ / 8, LO>(dp, va, sO[cur]);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int qi = nt * 8 + 2 * t + (e & 1), key = r + 8 * (e >> 1);
        const bool ok = q0 + qi >= key && q0 + qi < T && key < T;
        const float P = ok ? exp2f(s[nt][e] * scale2 - sL[cur][qi] * LOG2E) : 0.0f;
        s[nt][e] = P;
        dp[nt][e] = P * (dp[nt][e] - sD[cur][qi]);
      }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; kk++) {
      u32 a[4];
      c_to_a(a, s, kk);
      mma_rows_t<DV / 8, LO>(av, a, sO[cur] + kk * 16 * LO);
      c_to_a(a, dp, kk);
      mma_rows_t<DQK / 8, LQ>(ak, a, sQ[cur] + kk * 16 * LQ);
    }
    __syncthreads();
  }
  const float mk[2] = {scale, scale}, mv[2] = {1.0f, 1.0f};
  store_rows<DQK / 8>(dk + hd.qk, hd.ldq, r, T, ak, mk);
  store_rows<DV / 8>(dv + hd.vo, hd.ldv, r, T, av, mv);
}

// One set of entry points per head shape (DQK, DV), both multiples of 16. The host picks
// flash_*_<dqk>_<dv> when it exists and falls back to attention.cu otherwise.
#define FLASH_SHAPE(DQK, DV)                                                                              \
  KERNEL void __launch_bounds__(128) flash_fwd_##DQK##_##DV(const u16* q, const u16* k, const u16* v, \
                                                             float* o, float* lse, int T, int H, float scale) { \
    flash_fwd<DQK, DV>(q, k, v, o, lse, T, H, scale);                                                     \
  }                                                                                                       \
  KERNEL void __launch_bounds__(128) flash_dq_##DQK##_##DV(const u16* dO, const u16* q, const u16* k,  \
                                                            const u16* v, const float* lse, const float* D, \
                                                            float* dq, int T, int H, float scale) {         \
    flash_bwd_dq<DQK, DV>(dO, q, k, v, lse, D, dq, T, H, scale);                                          \
  }                                                                                                       \
  KERNEL void __launch_bounds__(128) flash_dkdv_##DQK##_##DV(const u16* dO, const u16* q, const u16* k, \
                                                              const u16* v, const float* lse, const float* D, \
                                                              float* dk, float* dv, int T, int H, float scale) { \
    flash_bwd_dkdv<DQK, DV>(dO, q, k, v, lse, D, dk, dv, T, H, scale);                                    \
  }

FLASH_SHAPE(32, 32)
FLASH_SHAPE(48, 32)
FLASH_SHAPE(64, 64)
FLASH_SHAPE(96, 64)
FLASH_SHAPE(128, 128)
