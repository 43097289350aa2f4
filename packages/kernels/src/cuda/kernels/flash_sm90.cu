// Causal attention on Hopper (sm_90a) for the BF16 attention core, FlashAttention-3 style: the
// matrix products run on wgmma (warpgroup MMAs, BF16 operands, f32 accumulators) fed by TMA copies
// into shared memory, with one producer warpgroup streaming tiles through mbarrier-synchronised
// stages and two consumer warpgroups doing the math. Same contract and numerics as flash.cu (the
// mma.sync kernels, which remain for other GPUs and head shapes): q, k, v, dO BF16; the forward
// makes one pass with an online softmax and feeds bf16(exp(s - running max)) to P @ V; the backward
// recomputes P = exp(s - lse), rounds dS = P (dP - D) to BF16 and applies the softmax scale to dq
// and dk at the end (exp2 on the MUFU unit flushes probabilities below 2^-126 to 0). The backward
// is two kernels, dq (per query tile) and dk/dv (per key tile), so every gradient element is summed
// by one thread in a fixed order: no atomics, the same bits every run. Layouts: q, k [B*T, H*DQK]; v, o, dO [B*T, H*DV] (o, dq, dk, dv f32); lse, D
// [B*H*T]. Head dimensions are multiples of 32 (each TMA box is 32 BF16 columns = 64 bytes, copied
// with the 64-byte swizzle; a tile of D columns is D/32 such boxes one after another).
//
// Tensor maps (2-D over [B*T, H*D] BF16, 64-byte swizzle, box {32, 128} for q/k/v tiles of 128 rows
// and {32, FA3_BQ} for the dk/dv kernel's query tiles): rows past a batch's end belong to the next batch
// (or read as zeros past the tensor), so every kernel masks by position rather than relying on
// zeros: keys past T are later than every query, and the backward masks queries past T itself.
//
// wgmma operand layouts used here (PTX ISA "matrix descriptor"): K-major (the reduction dimension
// contiguous: Q and K for S = Q K^T) with 8-row groups 512 bytes apart; MN-major (V for P V, K for
// dQ += dS K, dO and Q for dV += P^T dO and dK += dS^T Q: read "transposed", never copied) with the
// 32-column boxes LBO bytes apart and 8-row groups 512 bytes apart. A-from-registers: the f32 accumulator layout of one product is the A fragment
// layout of the next after rounding to BF16 pairs, as in flash.cu (c_to_a).

#include "sm90.cuh"

#define FA3_THREADS 384  // one producer warpgroup, two consumer warpgroups
#define FA3_BM 128       // forward: queries per CTA (64 per consumer warpgroup)
#define FA3_BN 128       // forward: keys per tile; backward: keys per CTA (64 per consumer warpgroup)
#define FA3_BQ 128       // backward dk/dv: queries per tile
#define FA3_STAGES 3
#ifndef FA3_PINGPONG
// The forward's consumer warpgroups take turns issuing their products (fa3_turn_*). Measured on the
// H200 at small's shape (notes/sm90-attention.md): forward 0.290 ms with, 0.305 without; the dq and
// dk/dv kernels were as fast or faster without, so they never take turns.
#define FA3_PINGPONG 1
#endif
#define FA3_LOG2E 1.4426950408889634f
#define FA3_LN2 0.6931471805599453f
// Dynamic shared memory of each entry point (checked against Fa3Rows / Fa3Keys by static_asserts).
#define FA3_FWD_SMEM_96_64 148560
#define FA3_DQ_SMEM_96_64 164944
#define FA3_DKDV_SMEM_96_64 167992
#define FA3_FWD_SMEM_64_64 115792
#define FA3_DQ_SMEM_64_64 132176
#define FA3_DKDV_SMEM_64_64 135224

// Descriptor of a BF16 operand stored in 64-byte-swizzled boxes (rows of 64 bytes, 8-row groups 512
// bytes apart). `lbo`: for MN-major operands, the bytes from one 32-column box to the next; unused
// (any value) for K-major ones. Boxes start 512-byte aligned.
__device__ __forceinline__ u64 fa3_desc(u32 saddr, u32 lbo) {
  return (u64)((saddr & 0x3ffffu) >> 4) | ((u64)((lbo >> 4) & 0x3fffu) << 16) | ((u64)(512 >> 4) << 32) |
         ((u64)2 << 62);
}

template <int N>
__device__ __forceinline__ void fa3_fence(float* d) {
#pragma unroll
  for (int i = 0; i < N; i++) reg_fence(d[i]);
}

// Keeps BF16 A fragments in registers, materialised, before a chain of register-A wgmmas: without
// it the compiler computes them between the wgmmas and must insert a warpgroup.arrive before each.
template <int KS>
__device__ __forceinline__ void fa3_fence_frags(u32 (*a)[4]) {
#pragma unroll
  for (int k = 0; k < KS; k++)
#pragma unroll
    for (int i = 0; i < 4; i++) asm volatile("" : "+r"(a[k][i])::"memory");
}

// 2^x on the MUFU unit (results below 2^-126 flush to 0: probabilities that small do not matter).
__device__ __forceinline__ float fa3_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The A fragment (m64 x k16) made of accumulator column chunks 2kk and 2kk+1, rounded to BF16.
__device__ __forceinline__ void fa3_c_to_a(u32* a, const float* c, int kk) {
  a[0] = sm90_pack_bf16(c[8 * kk + 0], c[8 * kk + 1]);
  a[1] = sm90_pack_bf16(c[8 * kk + 2], c[8 * kk + 3]);
  a[2] = sm90_pack_bf16(c[8 * kk + 4], c[8 * kk + 5]);
  a[3] = sm90_pack_bf16(c[8 * kk + 6], c[8 * kk + 7]);
}

// Turn-taking of the two consumer warpgroups (FlashAttention-3's ping-pong): a warpgroup issues a
// tile's first products only on its turn (named barrier 1 + cw, completed by the other warpgroup's
// arrival) and passes the turn right after issuing, so one warpgroup's softmax / elementwise work
// runs while the other's products occupy the tensor cores, instead of both in step. Warpgroup 1
// gives warpgroup 0 the first turn; the last pass of warpgroup 1 is skipped (nobody waits for it).
template <bool ON>
__device__ __forceinline__ void fa3_turn_first(int cw) {
  if (ON && cw == 1) named_arrive(1, 256);
}
template <bool ON>
__device__ __forceinline__ void fa3_turn_wait(int cw) {
  if (ON) named_sync(1 + cw, 256);
}
template <bool ON>
__device__ __forceinline__ void fa3_turn_pass(int cw, bool last) {
  if (ON && !(cw == 1 && last)) named_arrive(2 - cw, 256);
}

// Loads a [rows, D] BF16 tile as D/32 boxes of {32, rows} starting at (column c0, row r0).
template <int D, int ROWS>
__device__ __forceinline__ void fa3_load_tile(u8* s, const CUtensorMap* map, int c0, int r0, u64* bar) {
#pragma unroll
  for (int c = 0; c < D / 32; c++) tma_load_2d(s + c * ROWS * 64, map, c0 + 32 * c, r0, bar);
}

// The two kinds of CTA that own a tile of 128 queries and stream the key/value tiles before it: the
// forward (o, lse) and the backward's dq (recomputing S and dP from lse and D).
enum class Rows { Forward, Dq };

template <int DQK, int DV, Rows MODE>
struct Fa3Rows {
  static constexpr int Q_BYTES = FA3_BM * DQK * 2, O_BYTES = MODE == Rows::Dq ? FA3_BM * DV * 2 : 0;
  static constexpr int K_BYTES = FA3_BN * DQK * 2, V_BYTES = FA3_BN * DV * 2;
  static constexpr int SMEM = 1024 + Q_BYTES + O_BYTES + FA3_STAGES * (K_BYTES + V_BYTES) + (1 + 3 * FA3_STAGES) * 8;
};

// Online softmax of one key tile for the forward: s holds this thread's scores (rows r, r + 8),
// masked where diag, and leaves exp2(score - new max); m, l are the running max and sum, alpha the
// factor by which the output rows must be rescaled (the caller does it once their product is done).
template <int BN>
__device__ __forceinline__ void fa3_softmax(float* s, float* m, float* l, float* alpha, int k0, int r, bool diag,
                                            float scale2) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int row = r + 8 * hh;
    float mx = -f32_inf();
#pragma unroll
    for (int j = 0; j < BN / 8; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        float x = s[4 * j + 2 * hh + e] * scale2;
        if (diag && k0 + 8 * j + 2 * t + e > row) x = -f32_inf();
        s[4 * j + 2 * hh + e] = x;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m[hh], mx);
    // A row with no visible key yet keeps m = -inf; 0 stands in so that exp2 gives 0, not NaN.
    const float base = mn == -f32_inf() ? 0.0f : mn;
    alpha[hh] = exp2f(m[hh] - base);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
      s[4 * j + 2 * hh] = fa3_exp2(s[4 * j + 2 * hh] - base);
      s[4 * j + 2 * hh + 1] = fa3_exp2(s[4 * j + 2 * hh + 1] - base);
      sum += s[4 * j + 2 * hh] + s[4 * j + 2 * hh + 1];
    }
    l[hh] = l[hh] * alpha[hh] + sum;
    m[hh] = mn;
  }
}

// One CTA per (tile of 128 queries, batch * head), the heaviest (last) query tiles first. The producer
// loads Q (and dO for dq) once, then streams K and V tiles through the ring; each consumer warpgroup
// owns 64 query rows. Forward: out = o, lseOut = lse. Dq: lse and D are read, out = dq (written, not
// accumulated: each dq row is summed over its keys here, in a fixed order).
template <int DQK, int DV, Rows MODE>
__device__ __forceinline__ void fa3_rows(const CUtensorMap* tQ, const CUtensorMap* tK, const CUtensorMap* tV,
                                         const CUtensorMap* tO, const float* lse, const float* D, float* out,
                                         float* lseOut, int T, int H, float scale) {
  using L = Fa3Rows<DQK, DV, MODE>;
  constexpr int BM = FA3_BM, BN = FA3_BN, ST = FA3_STAGES;
  constexpr bool DQ = MODE == Rows::Dq, PP = FA3_PINGPONG && !DQ;
  extern __shared__ u8 fa3_dyn[];
  u8* base = fa3_dyn + ((1024 - (sm90_smem_u32(fa3_dyn) & 1023)) & 1023);
  u8* sQ = base;
  u8* sO = sQ + L::Q_BYTES;
  u8* sK = sO + L::O_BYTES;
  u8* sV = sK + ST * L::K_BYTES;
  u64* barQ = (u64*)(sV + ST * L::V_BYTES);
  u64* fullK = barQ + 1;
  u64* fullV = fullK + ST;
  u64* empty = fullV + ST;

  const int nq = cdiv(T, BM), qt = nq - 1 - blockIdx.x, q0 = qt * BM;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int rowBase = b * T;  // first row of this batch in [B*T, ...]
  const int tiles = cdiv(min(q0 + BM, T), BN);
  const int wg = threadIdx.x >> 7;

  if (threadIdx.x == 0) {
    mbar_init(barQ, 1);
    for (int s = 0; s < ST; s++) {
      mbar_init(&fullK[s], 1);
      mbar_init(&fullV[s], 1);
      mbar_init(&empty[s], 8);  // every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      mbar_expect_tx(barQ, L::Q_BYTES + L::O_BYTES);
      fa3_load_tile<DQK, BM>(sQ, tQ, h * DQK, rowBase + q0, barQ);
      if constexpr (DQ) fa3_load_tile<DV, BM>(sO, tO, h * DV, rowBase + q0, barQ);
      for (int it = 0; it < tiles; it++) {
        const int s = it % ST;
        if (it >= ST) mbar_wait(&empty[s], ((it / ST) - 1) & 1);
        mbar_expect_tx(&fullK[s], L::K_BYTES);
        fa3_load_tile<DQK, BN>(sK + s * L::K_BYTES, tK, h * DQK, rowBase + it * BN, &fullK[s]);
        mbar_expect_tx(&fullV[s], L::V_BYTES);
        fa3_load_tile<DV, BN>(sV + s * L::V_BYTES, tV, h * DV, rowBase + it * BN, &fullV[s]);
      }
    }
  } else {  // consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r = q0 + 64 * cw + 16 * warp + g;  // this thread's rows: r and r + 8
    const float scale2 = scale * FA3_LOG2E;
    const u32 qAddr = sm90_smem_u32(sQ) + cw * 64 * 64, oAddr = sm90_smem_u32(sO) + cw * 64 * 64;
    constexpr int NACC = DQ ? DQK / 2 : DV / 2;  // f32 accumulators: dq rows, or o rows
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; i++) acc[i] = 0.0f;
    float m[2] = {-f32_inf(), -f32_inf()}, l[2] = {0.0f, 0.0f};  // forward: running max and sum
    float L2[2], Dr[2];                                          // dq: lse * log2(e) and D of the rows
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const bool in = DQ && r + 8 * hh < T;
      L2[hh] = in ? lse[(i64)bh * T + r + 8 * hh] * FA3_LOG2E : 0.0f;
      Dr[hh] = in ? D[(i64)bh * T + r + 8 * hh] : 0.0f;
    }
    mbar_wait(barQ, 0);
    fa3_turn_first<PP>(cw);
    // S = Q K^T of the key tile in stage st into s (issued and committed, not waited for).
    auto issue_s = [&](float* sc, int st) {
      const u32 kAddr = sm90_smem_u32(sK + st * L::K_BYTES);
      fa3_fence<BN / 2>(sc);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < DQK / 16; ks++)
        wgmma_ss<BN, 0, 0>(sc, fa3_desc(qAddr + (ks >> 1) * BM * 64 + (ks & 1) * 32, 16),
                           fa3_desc(kAddr + (ks >> 1) * BN * 64 + (ks & 1) * 32, 16), ks);
      wgmma_commit();
    };
    // Some key of tile it is later than some row of this warpgroup: mask by position.
    auto diag = [&](int it) { return it * BN + BN - 1 > q0 + 64 * cw; };
    float s[BN / 2];
    u32 pa[BN / 16][4];
    if constexpr (!DQ) {
      // Forward, pipelined within the warpgroup (FlashAttention-3): tile it + 1's S = QK^T is issued
      // before tile it's O += P V, and its softmax runs while that product is on the tensor cores;
      // the output rows are rescaled once the product is done.
      float alpha[2];
      mbar_wait(&fullK[0], 0);
      issue_s(s, 0);
      wgmma_wait<0>();
      fa3_fence<BN / 2>(s);
      fa3_softmax<BN>(s, m, l, alpha, 0, r, diag(0), scale2);
#pragma unroll
      for (int kk = 0; kk < BN / 16; kk++) fa3_c_to_a(pa[kk], s, kk);
      fa3_fence_frags<BN / 16>(pa);
      // One tile's O += P V, with the next tile's S issued before it and its softmax after (tiles
      // before the last), or alone (the last).
      auto step = [&](int it, bool more) {
        const int st = it % ST, nx = it + 1, sn = nx % ST;
        const u32 vAddr = sm90_smem_u32(sV + st * L::V_BYTES);
        fa3_turn_wait<PP>(cw);
        if (more) {
          mbar_wait(&fullK[sn], (nx / ST) & 1);
          issue_s(s, sn);
        }
        mbar_wait(&fullV[st], (it / ST) & 1);
        fa3_fence<NACC>(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)  // O += P V (V: keys x dv, MN-major)
          wgmma_rs<DV, 1>(acc, pa[kk], fa3_desc(vAddr + kk * 16 * 64, BN * 64), 1);
        wgmma_commit();
        fa3_turn_pass<PP>(cw, !more);
        if (more) {
          wgmma_wait<1>();  // the next tile's scores (committed first)
          fa3_fence<BN / 2>(s);
          fa3_softmax<BN>(s, m, l, alpha, nx * BN, r, diag(nx), scale2);
          wgmma_wait<0>();  // O += P V: acc is this tile's, pa free again
          fa3_fence<NACC>(acc);
#pragma unroll
          for (int hh = 0; hh < 2; hh++)
#pragma unroll
            for (int j = 0; j < DV / 8; j++) acc[4 * j + 2 * hh] *= alpha[hh], acc[4 * j + 2 * hh + 1] *= alpha[hh];
#pragma unroll
          for (int kk = 0; kk < BN / 16; kk++) fa3_c_to_a(pa[kk], s, kk);
          fa3_fence_frags<BN / 16>(pa);
        } else {
          wgmma_wait<0>();
          fa3_fence<NACC>(acc);
        }
        __syncwarp();  // every lane's reads of the stage come before its warp's release
        if (lane == 0) mbar_arrive(&empty[st]);
      };
      for (int it = 0; it + 1 < tiles; it++) step(it, true);
      step(tiles - 1, false);
    } else {
      for (int it = 0; it < tiles; it++) {
        const int st = it % ST, k0 = it * BN;
        const u32 par = (it / ST) & 1;
        const u32 kAddr = sm90_smem_u32(sK + st * L::K_BYTES), vAddr = sm90_smem_u32(sV + st * L::V_BYTES);
        const bool dg = diag(it);
        float dp[BN / 2];
        mbar_wait(&fullK[st], par);
        mbar_wait(&fullV[st], par);
        fa3_turn_wait<PP>(cw);
        fa3_fence<BN / 2>(s);
        fa3_fence<BN / 2>(dp);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < DQK / 16; ks++)  // S = Q K^T
          wgmma_ss<BN, 0, 0>(s, fa3_desc(qAddr + (ks >> 1) * BM * 64 + (ks & 1) * 32, 16),
                             fa3_desc(kAddr + (ks >> 1) * BN * 64 + (ks & 1) * 32, 16), ks);
#pragma unroll
        for (int ks = 0; ks < DV / 16; ks++)  // dP = dO V^T
          wgmma_ss<BN, 0, 0>(dp, fa3_desc(oAddr + (ks >> 1) * BM * 64 + (ks & 1) * 32, 16),
                             fa3_desc(vAddr + (ks >> 1) * BN * 64 + (ks & 1) * 32, 16), ks);
        wgmma_commit();
        fa3_turn_pass<PP>(cw, it == tiles - 1);
        wgmma_wait<0>();
        fa3_fence<BN / 2>(s);
        fa3_fence<BN / 2>(dp);
        // dS = P (dP - D), P = exp(s - lse) recomputed; each 16 keys packed into their A fragment at
        // once, so that their f32 scores leave the registers early.
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
#pragma unroll
          for (int j = 2 * kk; j < 2 * kk + 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int key = k0 + 8 * j + 2 * t + (e & 1), hh = e >> 1;
              const float P = !dg || key <= r + 8 * hh ? fa3_exp2(s[4 * j + e] * scale2 - L2[hh]) : 0.0f;
              s[4 * j + e] = P * (dp[4 * j + e] - Dr[hh]);
            }
          fa3_c_to_a(pa[kk], s, kk);
        }
        fa3_fence_frags<BN / 16>(pa);
        fa3_fence<NACC>(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)  // dQ += dS K (K: keys x dqk, MN-major)
          wgmma_rs<DQK, 1>(acc, pa[kk], fa3_desc(kAddr + kk * 16 * 64, BN * 64), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fa3_fence<NACC>(acc);
        __syncwarp();  // every lane's reads of the stage come before its warp's release
        if (lane == 0) mbar_arrive(&empty[st]);
      }
    }
    float mul[2] = {scale, scale};  // dq: the softmax scale, applied once at the end
    if constexpr (!DQ) {
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        mul[hh] = 1.0f / sum;
        const int row = r + 8 * hh;
        if (t == 0 && row < T) lseOut[(i64)bh * T + row] = (m[hh] + log2f(sum)) * FA3_LN2;
      }
    }
    constexpr int W = DQ ? DQK : DV;
    const i64 ld = (i64)H * W;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int row = r + 8 * hh;
      if (row >= T) continue;
      float* orow = out + (i64)(rowBase + row) * ld + h * W;
#pragma unroll
      for (int j = 0; j < W / 8; j++)
        *(float2*)(orow + 8 * j + 2 * t) = make_float2(acc[4 * j + 2 * hh] * mul[hh], acc[4 * j + 2 * hh + 1] * mul[hh]);
    }
  }
}

template <int DQK, int DV>
struct Fa3Keys {
  static constexpr int K_BYTES = FA3_BN * DQK * 2, V_BYTES = FA3_BN * DV * 2;
  static constexpr int Q_BYTES = FA3_BQ * DQK * 2, O_BYTES = FA3_BQ * DV * 2, LD_BYTES = 2 * FA3_BQ * 4;
  static constexpr int SMEM = 1024 + K_BYTES + V_BYTES + FA3_STAGES * (Q_BYTES + O_BYTES + LD_BYTES) + (1 + 2 * FA3_STAGES) * 8;
};

// Backward dk, dv: one CTA per (tile of 128 keys, batch * head); each consumer warpgroup owns 64 keys
// and keeps their dk, dv in registers while the query tiles from the diagonal to the end stream
// through (S^T = K Q^T and dP^T = V dO^T have the keys as rows, so P^T and dS^T are the A operands of
// dV += P^T dO and dK += dS^T Q straight from the registers).
template <int DQK, int DV>
__device__ __forceinline__ void fa3_keys(const CUtensorMap* tQ, const CUtensorMap* tK, const CUtensorMap* tV,
                                         const CUtensorMap* tO, const float* lse, const float* D, float* dk, float* dv,
                                         int T, int H, float scale) {
  using L = Fa3Keys<DQK, DV>;
  constexpr int BN = FA3_BN, BQ = FA3_BQ, ST = FA3_STAGES;
  extern __shared__ u8 fa3_dyn[];
  u8* base = fa3_dyn + ((1024 - (sm90_smem_u32(fa3_dyn) & 1023)) & 1023);
  u8* sK = base;
  u8* sV = sK + L::K_BYTES;
  u8* sQ = sV + L::V_BYTES;
  u8* sO = sQ + ST * L::Q_BYTES;
  // lse * log2(e) [BQ], then D [BQ], of a query tile, double-buffered: the consumers themselves stage
  // them (global loads issued a tile ahead, a named barrier per tile), so that every shared-memory
  // write the consumers read is ordered by a barrier compute-sanitizer's racecheck understands.
  float* sLD = (float*)(sO + ST * L::O_BYTES);
  u64* barKV = (u64*)(sLD + ST * 2 * BQ);
  u64* full = barKV + 1;
  u64* empty = full + ST;

  const int k0 = blockIdx.x * BN, bh = blockIdx.y, b = bh / H, h = bh % H, rowBase = b * T;
  const int first = k0 / BQ, tiles = cdiv(T, BQ) - first;
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    mbar_init(barKV, 1);
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // producer: one thread issuing the TMA loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      mbar_expect_tx(barKV, L::K_BYTES + L::V_BYTES);
      fa3_load_tile<DQK, BN>(sK, tK, h * DQK, rowBase + k0, barKV);
      fa3_load_tile<DV, BN>(sV, tV, h * DV, rowBase + k0, barKV);
      for (int it = 0; it < tiles; it++) {
        const int s = it % ST, q0 = (first + it) * BQ;
        if (it >= ST) mbar_wait(&empty[s], ((it / ST) - 1) & 1);
        mbar_expect_tx(&full[s], L::Q_BYTES + L::O_BYTES);
        fa3_load_tile<DQK, BQ>(sQ + s * L::Q_BYTES, tQ, h * DQK, rowBase + q0, &full[s]);
        fa3_load_tile<DV, BQ>(sO + s * L::O_BYTES, tO, h * DV, rowBase + q0, &full[s]);
      }
    }
  } else {  // consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kr = k0 + 64 * cw + 16 * warp + g;  // this thread's keys: kr and kr + 8
    const float scale2 = scale * FA3_LOG2E;
    const u32 kAddr = sm90_smem_u32(sK) + cw * 64 * 64, vAddr = sm90_smem_u32(sV) + cw * 64 * 64;
    float adk[DQK / 2], adv[DV / 2];
#pragma unroll
    for (int i = 0; i < DQK / 2; i++) adk[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < DV / 2; i++) adv[i] = 0.0f;
    // Consumer thread ct < BQ stages lse of query q0 + ct, BQ <= ct < 2 BQ stages D of q0 + ct - BQ.
    const int ct = threadIdx.x - 128;
    auto fetch = [&](int it) {
      const int i = ct < BQ ? ct : ct - BQ, q = (first + it) * BQ + i;
      if (ct >= 2 * BQ || q >= T) return 0.0f;
      return ct < BQ ? lse[(i64)bh * T + q] * FA3_LOG2E : D[(i64)bh * T + q];
    };
    {
      const float v = fetch(0);
      if (ct < 2 * BQ) sLD[ct] = v;
      named_sync(1, 256);
    }
    mbar_wait(barKV, 0);
    for (int it = 0; it < tiles; it++) {
      const int st = it % ST, q0 = (first + it) * BQ;
      const u32 par = (it / ST) & 1;
      const u32 qAddr = sm90_smem_u32(sQ + st * L::Q_BYTES), oAddr = sm90_smem_u32(sO + st * L::O_BYTES);
      const float* sL = sLD + (it & 1) * 2 * BQ;
      const float* sD = sL + BQ;
      const float next = it + 1 < tiles ? fetch(it + 1) : 0.0f;  // lands while this tile is computed
      mbar_wait(&full[st], par);
      float s[BQ / 2], dp[BQ / 2];
      fa3_fence<BQ / 2>(s);
      fa3_fence<BQ / 2>(dp);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < DQK / 16; ks++)  // S^T = K Q^T
        wgmma_ss<BQ, 0, 0>(s, fa3_desc(kAddr + (ks >> 1) * BN * 64 + (ks & 1) * 32, 16),
                           fa3_desc(qAddr + (ks >> 1) * BQ * 64 + (ks & 1) * 32, 16), ks);
#pragma unroll
      for (int ks = 0; ks < DV / 16; ks++)  // dP^T = V dO^T
        wgmma_ss<BQ, 0, 0>(dp, fa3_desc(vAddr + (ks >> 1) * BN * 64 + (ks & 1) * 32, 16),
                           fa3_desc(oAddr + (ks >> 1) * BQ * 64 + (ks & 1) * 32, 16), ks);
      wgmma_commit();
      wgmma_wait<0>();
      fa3_fence<BQ / 2>(s);
      fa3_fence<BQ / 2>(dp);
      const bool mask = q0 < k0 + BN || q0 + BQ > T;  // the diagonal tiles, and rows past T
      // P^T and dS^T = P^T (dP^T - D), each 16 queries packed into their A fragments at once, so
      // that their f32 scores leave the registers early.
      u32 pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++) {
#pragma unroll
        for (int j = 2 * kk; j < 2 * kk + 2; j++) {
          // This thread's two queries of column chunk j: their lse and D in one 8-byte load each.
          const float2 l2 = *(const float2*)(sL + 8 * j + 2 * t), d2 = *(const float2*)(sD + 8 * j + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int qi = 8 * j + 2 * t + (e & 1), q = q0 + qi, key = kr + 8 * (e >> 1);
            const bool ok = !mask || (q >= key && q < T);
            const float P = ok ? fa3_exp2(s[4 * j + e] * scale2 - ((e & 1) ? l2.y : l2.x)) : 0.0f;
            s[4 * j + e] = P;
            dp[4 * j + e] = P * (dp[4 * j + e] - ((e & 1) ? d2.y : d2.x));
          }
        }
        fa3_c_to_a(pa[kk], s, kk);
        fa3_c_to_a(da[kk], dp, kk);
      }
      fa3_fence_frags<BQ / 16>(pa);
      fa3_fence_frags<BQ / 16>(da);
      fa3_fence<DV / 2>(adv);
      fa3_fence<DQK / 2>(adk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++)  // dV += P^T dO (dO: queries x dv, MN-major)
        wgmma_rs<DV, 1>(adv, pa[kk], fa3_desc(oAddr + kk * 16 * 64, BQ * 64), 1);
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++)  // dK += dS^T Q (Q: queries x dqk, MN-major)
        wgmma_rs<DQK, 1>(adk, da[kk], fa3_desc(qAddr + kk * 16 * 64, BQ * 64), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fa3_fence<DV / 2>(adv);
      fa3_fence<DQK / 2>(adk);
      __syncwarp();  // every lane's reads of the stage come before its warp's release
      if (lane == 0) mbar_arrive(&empty[st]);
      if (it + 1 < tiles) {  // the next tile's lse, D into the other buffer, read after this barrier
        if (ct < 2 * BQ) sLD[((it + 1) & 1) * 2 * BQ + ct] = next;
        named_sync(1, 256);
      }
    }
    const i64 ldq = (i64)H * DQK, ldv = (i64)H * DV;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int key = kr + 8 * hh;
      if (key >= T) continue;
      float* krow = dk + (i64)(rowBase + key) * ldq + h * DQK;
      float* vrow = dv + (i64)(rowBase + key) * ldv + h * DV;
#pragma unroll
      for (int j = 0; j < DQK / 8; j++)
        *(float2*)(krow + 8 * j + 2 * t) = make_float2(adk[4 * j + 2 * hh] * scale, adk[4 * j + 2 * hh + 1] * scale);
#pragma unroll
      for (int j = 0; j < DV / 8; j++)
        *(float2*)(vrow + 8 * j + 2 * t) = make_float2(adv[4 * j + 2 * hh], adv[4 * j + 2 * hh + 1]);
    }
  }
}

// Entry points per head shape (both multiples of 32); the host picks fa3_*_<dqk>_<dv> on a
// compute-capability-9.0 GPU when it exists. Tensor maps: fwd and dq take q, k, v (and dO) with
// 128-row boxes; dkdv takes q and dO with FA3_BQ-row boxes, k and v with 128-row boxes.
#define FA3_SHAPE(DQK, DV)                                                                                        \
  static_assert(Fa3Rows<DQK, DV, Rows::Forward>::SMEM == FA3_FWD_SMEM_##DQK##_##DV, "FA3_FWD_SMEM");          \
  static_assert(Fa3Rows<DQK, DV, Rows::Dq>::SMEM == FA3_DQ_SMEM_##DQK##_##DV, "FA3_DQ_SMEM");                 \
  static_assert(Fa3Keys<DQK, DV>::SMEM == FA3_DKDV_SMEM_##DQK##_##DV, "FA3_DKDV_SMEM");                       \
  KERNEL void __launch_bounds__(FA3_THREADS, 1)                                                                   \
      fa3_fwd_##DQK##_##DV(const __grid_constant__ CUtensorMap tQ, const __grid_constant__ CUtensorMap tK,       \
                           const __grid_constant__ CUtensorMap tV, float* o, float* lse, int T, int H, float scale) { \
    fa3_rows<DQK, DV, Rows::Forward>(&tQ, &tK, &tV, nullptr, nullptr, nullptr, o, lse, T, H, scale);              \
  }                                                                                                               \
  KERNEL void __launch_bounds__(FA3_THREADS, 1)                                                                   \
      fa3_dq_##DQK##_##DV(const __grid_constant__ CUtensorMap tQ, const __grid_constant__ CUtensorMap tK,        \
                          const __grid_constant__ CUtensorMap tV, const __grid_constant__ CUtensorMap tO,        \
                          const float* lse, const float* D, float* dq, int T, int H, float scale) {               \
    fa3_rows<DQK, DV, Rows::Dq>(&tQ, &tK, &tV, &tO, lse, D, dq, nullptr, T, H, scale);                            \
  }                                                                                                               \
  KERNEL void __launch_bounds__(FA3_THREADS, 1)                                                                   \
      fa3_dkdv_##DQK##_##DV(const __grid_constant__ CUtensorMap tQ, const __grid_constant__ CUtensorMap tK,      \
                            const __grid_constant__ CUtensorMap tV, const __grid_constant__ CUtensorMap tO,      \
                            const float* lse, const float* D, float* dk, float* dv, int T, int H, float scale) {  \
    fa3_keys<DQK, DV>(&tQ, &tK, &tV, &tO, lse, D, dk, dv, T, H, scale);                                           \
  }

FA3_SHAPE(96, 64)
FA3_SHAPE(64, 64)
