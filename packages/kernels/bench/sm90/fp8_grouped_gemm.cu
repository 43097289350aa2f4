// Hopper (sm_90a) FP8 grouped GEMM for the experts' Fprop: C[rows, N] = A[rows, K] B_e[N, K]^T with
// DeepSeek-V3 scaling. Compiled by NVRTC with ../kernels/common.cuh prepended (u8/u32/u64/i64,
// KERNEL, cdiv and f32_to_bf16 come from there; nothing here redefines them), sm_90a only.
//
// Operands (both E4M3, K contiguous):
//   A  [rows, K], one f32 scale per 1x128 tile: As [rows, ceil(K/128)]
//   B  [E, N, K], one f32 scale per 128x128 block: Bs [E, ceil(N/128), ceil(K/128)]
//   off int32 [E+1] on the device: expert e owns rows off[e] .. off[e+1]-1 of A and C (any sizes, 0 too)
//   C  [rows, N] f32 (or BF16, RNE)
// Per output: C[r,n] = sum over 128-chunks kc of (sum_k A[r,k] B[n,k]) * As[r,kc] * Bs[e,n/128,kc];
// the inner 128-long sum is done by the tensor cores (wgmma m64nNk32, fresh accumulator per chunk)
// and promoted into f32 registers after every chunk: acc = acc + (part * sa) * sb, rounded in the
// reference's order (EXACT = 1, fp8-core scaledMatmul), or acc = fma(part, sa * sb, acc) (EXACT = 0).
//
// Structure (one CTA per SM, persistent): NWG consumer warpgroups (64 rows each, BM = 64 * NWG rows
// of one expert) x BN columns (128, or 256 as two n128 halves), plus one producer warpgroup whose
// first thread streams the 128-deep K chunks of A and B through a ring of STAGES shared-memory stages
// with TMA (cp.async.bulk.tensor, 128-byte swizzle: one 128-byte row of a tile = one K chunk of one
// row) and mbarriers (full: TMA bytes landed; empty: every consumer warp is done reading). The tile
// schedule is computed on the device from the offsets: m-tiles of each expert in order, n fastest,
// tile t = blockIdx.x + i * gridDim.x. No host synchronisation; a grid of (SMs x CTAs per SM)
// blocks serves any routing. TMA reads rows past an expert's end (the next expert's, harmless, never
// stored) and zero-fills past the tensor's end; stores are guarded by row < off[e+1] and col < N.
// The epilogue either stores from registers (EPI = 0) or stages C in shared memory and writes it with
// TMA stores (EPI = 1, 2; an expert's last, partial m-tile falls back to guarded register stores).
//
// Launch: blockDim = 128 * (NWG + 1), dynamic shared memory sm90_smem_bytes(NWG, BN, STAGES, EPI,
// OUTBF16, PAD) (cuFuncSetAttribute above 48 KB), grid = SMs x MINB; tensor maps (host,
// cuTensorMapEncodeTiled, 128-byte swizzle): A UINT8 [rows, K] box {128, BM}; B UINT8 [E * N, K] box
// {128, BN}; C [rows, N] FLOAT32 box {32, 64} or BFLOAT16 box {64, 64} (read by EPI > 0 only).
// Requires K % 16 == 0 (TMA row stride), N % 8 == 0, E <= SM90_MAX_E. Measured variants and their
// numbers: packages/kernels/notes/sm90-gemm.md; harness: bench.py beside this file.

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) Sm90TmaMap {
  u64 words[16];
};

#ifndef SM90_WATCHDOG
#define SM90_WATCHDOG 1  // trap instead of hanging when a barrier never completes (~4 s)
#endif

__device__ __forceinline__ u32 sm90_smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sm90_smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm90_smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(sm90_smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
  const u32 a = sm90_smem_u32(bar);
  u32 done;
#if SM90_WATCHDOG
  const long long t0 = clock64();
#endif
  for (;;) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
    if (done) return;
#if SM90_WATCHDOG
    if (clock64() - t0 > 8000000000ll) asm volatile("trap;");
#endif
  }
}

// 2-D TMA load of a box at (inner coordinate c0, row c1) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const Sm90TmaMap* map, int c0, int c1, u64* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          sm90_smem_u32(dst)),
      "l"((u64)map), "r"(sm90_smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// wgmma shared-memory descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes, 8-row
// groups 1024 bytes apart (stride byte offset), leading byte offset unused, tile 1024-byte aligned.
// Moving along K inside the 128-byte row is a plain +bytes on the start address.
__device__ __forceinline__ u64 sm90_desc(u32 saddr) {
  return (u64)((saddr & 0x3ffffu) >> 4) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across the asynchronous MMAs.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d (+)= A * B^T for one m64n64k32 step: A, B from shared memory (descriptors), f32 accumulators.
__device__ __forceinline__ void wgmma_n64(float* d, u64 da, u64 db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
}

// d (+)= A * B^T for one m64n128k32 step: A, B from shared memory (descriptors), f32 accumulators.
__device__ __forceinline__ void wgmma_n128(float* d, u64 da, u64 db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}


template <int BN>
__device__ __forceinline__ void wgmma_bn(float* d, u64 da, u64 db, int accumulate) {
  if constexpr (BN == 64) wgmma_n64(d, da, db, accumulate);
  else wgmma_n128(d, da, db, accumulate);
}

// Shared memory: STAGES x (A tile BM x 128 bytes, B tile BN x 128 bytes), then (EPI = 1) the C
// staging tiles (per consumer warpgroup 64 rows x 128 columns, in 128-byte strips), full/empty barriers, the
// offsets and the prefix sums of m-tiles per expert (E <= SM90_MAX_E); PAD (1024 or 0) for the
// 1024-byte alignment of the tiles (PAD = 0: the kernel traps unless the dynamic shared memory
// already starts 1024-aligned, which it does when the kernel has no static shared memory).
#define SM90_MAX_E 256
__host__ __device__ constexpr int sm90_smem_bytes(int nwg, int bn, int stages, int epi, int outbf16, int pad) {
  return pad + stages * (64 * nwg + bn) * 128 + (epi ? nwg * 64 * 128 * (outbf16 ? 2 : 4) * (epi == 2 ? bn / 128 : 1) : 0) +
         2 * stages * 8 +
         2 * (SM90_MAX_E + 1) * 4;
}

// 2-D TMA store of a shared box to global at (inner coordinate c0, row c1); clipped at the tensor's
// bounds. Completes in the issuing thread's bulk group.
__device__ __forceinline__ void tma_store_2d(const Sm90TmaMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((u64)map),
               "r"(sm90_smem_u32(src)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_store_2d_u32(const Sm90TmaMap* map, u32 src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((u64)map),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until the issuing thread's bulk stores have finished reading shared memory.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Two f32 -> BF16 (RNE, NaN -> 0x7fff, as f32_to_bf16), lo in the low half.
__device__ __forceinline__ u32 sm90_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The 4 k32 wgmmas of one 128-deep chunk into a fresh accumulator p (P32 = 0), issued and committed
// as one group; the caller waits.
template <int BN, int ACC>
__device__ __forceinline__ void mma_chunk(float (&p)[ACC], u32 aAddr, u32 bAddr) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ks++) wgmma_bn<BN>(p, sm90_desc(aAddr + ks * 32), sm90_desc(bAddr + ks * 32), ks);
  wgmma_commit();
}

// acc += p * (row scale) * sb, accumulator i belonging to row g (i & 2 == 0) or g + 8.
template <int EXACT, int ACC>
__device__ __forceinline__ void promote(float (&acc)[ACC], float (&p)[ACC], float sa0, float sa1, float sb) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
  if (EXACT) {
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(__fmul_rn(p[i], (i & 2) ? sa1 : sa0), sb));
  } else {
    const float c0 = sa0 * sb, c1 = sa1 * sb;
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = fmaf(p[i], (i & 2) ? c1 : c0, acc[i]);
  }
}

// Template parameters: NWG consumer warpgroups (BM = 64 NWG), BN columns, STAGES, EXACT promotion
// order, OUTBF16, MINB CTAs per SM, EPI (0: stores from registers; 1: C staged in shared memory and
// written by TMA stores, registers for an expert's last, partial m-tile; 2: as 1 with one staging
// buffer per 128-column half), PIPE (1: two accumulator
// sets, chunk k+1's wgmmas run while chunk k is promoted), P32 (numerics experiment: promote after
// every k32 wgmma instead of every 128).
template <int NWG, int BN, int STAGES, int EXACT, int OUTBF16, int MINB, int EPI, int PIPE, int P32, int PAD>
__device__ __forceinline__ void sm90_fp8_grouped(const Sm90TmaMap* tA, const Sm90TmaMap* tB, const Sm90TmaMap* tC,
                                                 const float* As, const float* Bs, void* C, const int* off, int E,
                                                 int N, int K) {
  constexpr int BM = 64 * NWG;
  constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128;
  constexpr int NH = BN / 128;  // 128-column halves of the tile, one m64n128 wgmma chain each
  constexpr int ACC = 64;       // f32 accumulators per thread per half (m64 x n128 over 128 threads)
  static_assert(BN == 128 || BN == 256, "BN is 128 or 256");
  constexpr int ESZ = OUTBF16 ? 2 : 4;
  constexpr int CW = 128 / ESZ;  // output columns per 128-byte strip
  // C staging per consumer warpgroup: one 64 x 128 half (EPI = 1) or all NH halves (EPI = 2: the second
  // half's staging need not wait for the first half's stores to have read the buffer).
  constexpr int C_HALF = 64 * 128 * ESZ;
  constexpr int C_BYTES = EPI ? C_HALF * (EPI == 2 ? NH : 1) : 0;
  extern __shared__ u8 sm90_dyn[];
  u8* base = sm90_dyn + (PAD ? ((1024 - (sm90_smem_u32(sm90_dyn) & 1023)) & 1023) : 0);
  if ((!PAD && (sm90_smem_u32(sm90_dyn) & 1023)) || E > SM90_MAX_E) asm volatile("trap;");
  u8* sA = base;
  u8* sB = base + STAGES * A_BYTES;
  u8* sC = sB + STAGES * B_BYTES;
  u64* full = (u64*)(sC + NWG * C_BYTES);
  u64* empty = full + STAGES;
  int* soff = (int*)(empty + STAGES);  // E + 1 offsets
  int* mpre = soff + SM90_MAX_E + 1;   // E + 1 prefix sums of m-tiles

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4 * NWG);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (warp == 0) {
    int carry = 0;
    for (int b = 0; b < E; b += 32) {
      const int e = b + lane;
      int v = 0;
      if (e < E) {
        const int lo = off[e], hi = off[e + 1];
        soff[e] = lo;
        if (e == E - 1) soff[E] = hi;
        v = cdiv(hi - lo, BM);
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
      }
      if (e < E) mpre[e + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) mpre[0] = 0;
  }
  __syncthreads();

  const int NT = cdiv(N, BN), NB = cdiv(N, 128), KC = cdiv(K, 128);
  const int total = mpre[E] * NT;

  if (warp >= 4 * NWG) {
    // Producer warpgroup: one thread issues the TMA loads, the rest give their registers away.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 4 * NWG && lane == 0) {
      int s = 0;
      u32 ph = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const int mt = t / NT, nt = t - mt * NT;
        int lo = 0, hi = E - 1;
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (mpre[mid] <= mt) lo = mid;
          else hi = mid - 1;
        }
        const int row0 = soff[lo] + (mt - mpre[lo]) * BM;
        const int brow = lo * N + nt * BN;
        for (int kc = 0; kc < KC; kc++) {
          mbar_wait(&empty[s], ph ^ 1);
          mbar_expect_tx(&full[s], A_BYTES + B_BYTES);
          tma_load_2d(sA + s * A_BYTES, tA, kc * 128, row0, &full[s]);
          tma_load_2d(sB + s * B_BYTES, tB, kc * 128, brow, &full[s]);
          if (++s == STAGES) s = 0, ph ^= 1;
        }
      }
    }
  } else {
  // Consumer warpgroup wg: rows 64 * wg .. of the tile; this thread: rows g and g + 8 of its warp's 16.
  // Registers per consumer thread after the producer's release (65536 per SM, MINB CTAs per SM).
  if constexpr (MINB == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n");
  else if constexpr (NWG == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  else asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  const int wg = warp >> 2, g = lane >> 2, tq = lane & 3;
  const int wrow = 16 * (warp & 3) + g;  // row of accumulators i & 2 == 0 within the warpgroup's 64
  const int rloc = 64 * wg + wrow;
  const u32 aBase = sm90_smem_u32(sA + wg * 64 * 128), bBase = sm90_smem_u32(sB);
  const u32 csBase = sm90_smem_u32(sC);
  int s = 0;
  u32 ph = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int mt = t / NT, nt = t - mt * NT;
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (mpre[mid] <= mt) lo = mid;
      else hi = mid - 1;
    }
    const int e = lo;
    const int row0 = soff[e] + (mt - mpre[e]) * BM, rowEnd = soff[e + 1];
    const int n0 = nt * BN;
    const int r0 = row0 + rloc, r1 = r0 + 8;
    // Scales of this thread's two rows and of the B blocks (32-bit offsets: fewer live registers).
    // Half h of the tile (columns n0 + 128 h ..) uses B block n0 / 128 + h (clamped: a half past N
    // computes garbage that is never stored).
    const u32 ia0 = (u32)min(r0, rowEnd - 1) * KC, ia1 = (u32)min(r1, rowEnd - 1) * KC;
    const float* as0 = As + ia0;
    const float* as1 = As + ia1;
    const float* bs = Bs + ((u32)e * NB + n0 / 128) * KC;
    const int bs1 = (n0 / 128 + 1 < NB ? KC : 0);  // offset of the second half's B scales

    float acc[NH][ACC];
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
      for (int i = 0; i < ACC; i++) acc[h][i] = 0.0f;
    if constexpr (P32) {
      static_assert(NH == 1, "P32 is for 128-wide tiles");
      float p[ACC];
      for (int kc = 0; kc < KC; kc++) {
        const float sa0 = __ldg(as0 + kc), sa1 = __ldg(as1 + kc), sb = __ldg(bs + kc);
        mbar_wait(&full[s], ph);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
#pragma unroll
          for (int i = 0; i < ACC; i++) reg_fence(p[i]);
          wgmma_fence();
          wgmma_bn<128>(p, sm90_desc(aBase + s * A_BYTES + ks * 32), sm90_desc(bBase + s * B_BYTES + ks * 32), 0);
          wgmma_commit();
          wgmma_wait<0>();
          promote<EXACT>(acc[0], p, sa0, sa1, sb);
        }
        if (lane == 0) mbar_arrive(&empty[s]);
        if (++s == STAGES) s = 0, ph ^= 1;
      }
    } else if constexpr (!PIPE) {
      float p[ACC];
      for (int kc = 0; kc < KC; kc++) {
        const float sa0 = __ldg(as0 + kc), sa1 = __ldg(as1 + kc), sb0 = __ldg(bs + kc);
        const float sb1 = NH > 1 ? __ldg(bs + bs1 + kc) : 0.0f;
        mbar_wait(&full[s], ph);
#pragma unroll
        for (int h = 0; h < NH; h++) {
          mma_chunk<128>(p, aBase + s * A_BYTES, bBase + s * B_BYTES + h * 128 * 128);
          wgmma_wait<0>();
          if (h == NH - 1 && lane == 0) mbar_arrive(&empty[s]);
          promote<EXACT>(acc[h], p, sa0, sa1, h ? sb1 : sb0);
        }
        if (++s == STAGES) s = 0, ph ^= 1;
      }
    } else {
      static_assert(NH == 1, "PIPE is for 128-wide tiles (registers)");
      // Two accumulator sets: chunk kc's wgmmas are issued before chunk kc-1 is promoted (wait_group 1).
      float p0[ACC], p1[ACC];
      float a00 = __ldg(as0), a01 = __ldg(as1), b0 = __ldg(bs), a10 = 0.f, a11 = 0.f, b1 = 0.f;
      int st0 = s, st1 = 0;
      mbar_wait(&full[s], ph);
      mma_chunk<128>(p0, aBase + s * A_BYTES, bBase + s * B_BYTES);
      if (++s == STAGES) s = 0, ph ^= 1;
      int kc = 1;
      for (; kc + 1 < KC; kc += 2) {
        a10 = __ldg(as0 + kc), a11 = __ldg(as1 + kc), b1 = __ldg(bs + kc);
        st1 = s;
        mbar_wait(&full[s], ph);
        mma_chunk<128>(p1, aBase + s * A_BYTES, bBase + s * B_BYTES);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote<EXACT>(acc[0], p0, a00, a01, b0);
        a00 = __ldg(as0 + kc + 1), a01 = __ldg(as1 + kc + 1), b0 = __ldg(bs + kc + 1);
        st0 = s;
        mbar_wait(&full[s], ph);
        mma_chunk<128>(p0, aBase + s * A_BYTES, bBase + s * B_BYTES);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st1]);
        promote<EXACT>(acc[0], p1, a10, a11, b1);
      }
      if (kc < KC) {  // one chunk left (KC even): into p1, then drain both
        a10 = __ldg(as0 + kc), a11 = __ldg(as1 + kc), b1 = __ldg(bs + kc);
        st1 = s;
        mbar_wait(&full[s], ph);
        mma_chunk<128>(p1, aBase + s * A_BYTES, bBase + s * B_BYTES);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote<EXACT>(acc[0], p0, a00, a01, b0);
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[st1]);
        promote<EXACT>(acc[0], p1, a10, a11, b1);
      } else {  // KC odd: p0 holds the last chunk
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote<EXACT>(acc[0], p0, a00, a01, b0);
      }
    }

    // Epilogue, per 128-column half h: accumulator i is row (i & 2 ? g + 8 : g), column
    // n0 + 128 h + 8 (i / 4) + 2 tq + (i & 1).
    const bool last = t + (int)gridDim.x >= total;
    if (EPI && row0 + BM <= rowEnd) {
      // Whole tile inside the expert: stage this warpgroup's 64 x 128 in 128-byte strips with the TMA
      // 128-byte swizzle (16-byte chunk index ^= row & 7: conflict-free), then TMA-store the strips.
      const bool leader = (threadIdx.x & 127) == 0;
      const u32 cs = csBase + (threadIdx.x >> 7) * C_BYTES;
#pragma unroll
      for (int h = 0; h < NH; h++) {
        const int nh = n0 + 128 * h;
        const u32 csh = cs + (EPI == 2 ? h * C_HALF : 0);
        if (EPI == 1 || h == 0) {
          if (leader) bulk_wait_read();  // the previous stores have read the staging buffer
          named_sync(1 + wg, 128);
        }
#pragma unroll
        for (int j = 0; j < 16; j++) {
          const int col = 8 * j + 2 * tq, strip = col / CW, cb = (col % CW) * ESZ;  // byte in the 128-byte row
#pragma unroll
          for (int hh = 0; hh < 2; hh++) {
            const int r = wrow + 8 * hh;
            const u32 p = csh + strip * 64 * 128 + r * 128 + ((((cb >> 4) ^ (r & 7))) << 4) + (cb & 15);
            if (OUTBF16)
              asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(p),
                           "r"(sm90_bf16x2(acc[h][4 * j + 2 * hh], acc[h][4 * j + 2 * hh + 1]))
                           : "memory");
            else
              asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(p), "f"(acc[h][4 * j + 2 * hh]),
                           "f"(acc[h][4 * j + 2 * hh + 1])
                           : "memory");
          }
        }
        fence_async_smem();
        named_sync(1 + wg, 128);
        if (leader) {
#pragma unroll
          for (int st = 0; st < 128 / CW; st++)
            if (nh + st * CW < N) tma_store_2d_u32(tC, csh + st * 64 * 128, nh + st * CW, row0 + 64 * wg);
          bulk_commit();
          // The CTA's last tile: the copies must have read the staging buffer before the CTA exits
          // (a wait after the loop instead makes ptxas cap the consumers' registers below setmaxnreg).
          if (last && h == NH - 1) bulk_wait_all();
        }
      }
      continue;
    }
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
      for (int j = 0; j < 16; j++) {
        const int col = n0 + 128 * h + 8 * j + 2 * tq;
        if (col >= N) continue;
        if (OUTBF16) {
          u32* c = (u32*)C;
          if (r0 < rowEnd) c[((i64)r0 * N + col) >> 1] = sm90_bf16x2(acc[h][4 * j], acc[h][4 * j + 1]);
          if (r1 < rowEnd) c[((i64)r1 * N + col) >> 1] = sm90_bf16x2(acc[h][4 * j + 2], acc[h][4 * j + 3]);
        } else {
          float* c = (float*)C;
          if (r0 < rowEnd) *(float2*)(c + (i64)r0 * N + col) = make_float2(acc[h][4 * j], acc[h][4 * j + 1]);
          if (r1 < rowEnd) *(float2*)(c + (i64)r1 * N + col) = make_float2(acc[h][4 * j + 2], acc[h][4 * j + 3]);
        }
      }
    if (EPI && (threadIdx.x & 127) == 0 && last) bulk_wait_all();
  }
  }  // consumer
}

// Entry points (one signature for all): tC is the output's tensor map ([rows, N], box {128 bytes of
// columns, 64 rows}, 128-byte swizzle), read only by EPI = 1 entries.
#define SM90_ENTRY(NAME, NWG, BN, STAGES, EXACT, OUTBF16, MINB, EPI, PIPE, P32, PAD)                                 \
  KERNEL void __launch_bounds__(128 * (NWG + 1), MINB)                                                         \
      NAME(const __grid_constant__ Sm90TmaMap tA, const __grid_constant__ Sm90TmaMap tB,                        \
           const __grid_constant__ Sm90TmaMap tC, const float* As, const float* Bs, void* C, const int* off,     \
           int E, int N, int K) {                                                                               \
    sm90_fp8_grouped<NWG, BN, STAGES, EXACT, OUTBF16, MINB, EPI, PIPE, P32, PAD>(&tA, &tB, &tC, As, Bs, C, off, \
                                                                                 E, N, K);                      \
  }
// v1 (register epilogue)
SM90_ENTRY(sm90_fp8_grouped_128x128_s6_fma_f32, 2, 128, 6, 0, 0, 1, 0, 0, 0, 1024)
// v2: TMA-store epilogue, two-buffer mainloop
SM90_ENTRY(sm90_fp8_grouped_128x128_s4_fma_f32_tma, 2, 128, 4, 0, 0, 1, 1, 0, 0, 1024)
SM90_ENTRY(sm90_fp8_grouped_128x128_s5_fma_bf16_tma_pipe, 2, 128, 5, 0, 1, 1, 1, 1, 0, 1024)
// v3: 128 x 256 tiles (each warpgroup two n128 halves per chunk): 25% less L2 -> SM traffic per FLOP
SM90_ENTRY(sm90_fp8_grouped_128x256_s3_fma_f32_tma, 2, 256, 3, 0, 0, 1, 1, 0, 0, 1024)
SM90_ENTRY(sm90_fp8_grouped_128x256_s3_fma_bf16_tma, 2, 256, 3, 0, 1, 1, 1, 0, 0, 1024)
// v4: no alignment pad and a 256-expert table: one more stage fits
SM90_ENTRY(sm90_fp8_grouped_128x256_s4_fma_bf16_tma_np, 2, 256, 4, 0, 1, 1, 1, 0, 0, 0)
SM90_ENTRY(sm90_fp8_grouped_128x128_s6_fma_bf16_tma_pipe_np, 2, 128, 6, 0, 1, 1, 1, 1, 0, 0)
SM90_ENTRY(sm90_fp8_grouped_128x128_s5_fma_f32_tma_pipe_np, 2, 128, 5, 0, 0, 1, 1, 1, 0, 0)
// v5: 128 x 256 with a staging buffer per half (BF16 output)
SM90_ENTRY(sm90_fp8_grouped_128x256_s3_fma_bf16_tma2, 2, 256, 3, 0, 1, 1, 2, 0, 0, 1024)
