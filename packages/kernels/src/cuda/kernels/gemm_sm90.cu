// Hopper (sm_90a) FP8 grouped GEMM for the experts: C[rows, N] (+)= A[rows, K] B_e[N, K]^T with
// DeepSeek-V3's fine-grained scaling, on wgmma tensor cores fed by TMA. The backend calls it on a
// compute-capability-9.0 GPU for the grouped Fprop and Dgrad (segments along M, both operands
// K-contiguous, E4M3 x E4M3, promotion 128); every other FP8 GEMM, and every GEMM on other GPUs,
// runs gemm.cu's mma.sync kernels. Developed and measured standalone first: notes/sm90-gemm.md.
//
// Operands (FP8 codes, K contiguous):
//   A  [rows, K], one f32 scale per 1x128 tile: As [rows, ceil(K/128)]
//   B  [E, N, K], one f32 scale per 128x128 block: Bs [E, ceil(N/128), ceil(K/128)]
//   off int32 [E+1] on the device: expert e owns rows off[e] .. off[e+1]-1 of A and C (any sizes, 0 too)
//   C  [rows, N], by outMode: SM90_OUT_F32 f32 storage; SM90_OUT_ROUND f32 storage of each result
//      rounded to BF16 (RNE, round_bf16); SM90_OUT_BF16 BF16 storage (the same rounding, half the
//      bytes: the experts' activations, whose consumers read BF16); SM90_OUT_FP8 FP8 codes with
//      1x128 scales in Cs (the output handed to a next FP8 GEMM, never stored in f32). accumulate (f32 storage only)
//      adds the (rounded) result to C: C = C + v, as gemm.cu's mma_store does. Without accumulate the
//      kernel also writes 0 to the rows outside every segment (before off[0], from off[E] to rows),
//      so C needs no clearing first.
// Per output: C[r,n] = sum over 128-chunks kc of (sum_k A[r,k] B[n,k]) * As[r,kc] * Bs[e,n/128,kc];
// the inner 128-long sum is done by the tensor cores (wgmma m64n128k32, fresh accumulator per
// chunk) and promoted into f32 registers after every chunk: acc = fma(part, sa * sb, acc).
// Numerics: wgmma accumulates FP8 products with ~14 bits inside each instruction (the Hopper
// behaviour the DeepSeek-V3 report describes), so a result differs from the exact chunked sum of
// the reference (fp8-core scaledMatmul, gemm.cu) by ~2.5e-4 relative; promotion every 128 bounds it.
//
// Structure (one CTA per SM, persistent): two consumer warpgroups (64 rows each: BM = 128 rows of
// one expert) x BN columns (128, or 256 as two n128 halves), plus one producer warpgroup whose first
// thread streams the 128-deep K chunks of A and B through a ring of STAGES shared-memory stages with
// TMA (cp.async.bulk.tensor, 128-byte swizzle: one 128-byte row of a tile = one K chunk of one row)
// and mbarriers (full: the TMA bytes landed; empty: every consumer warp is done reading). The tile
// schedule is computed on the device from the offsets: m-tiles of each expert in order, n fastest,
// tile t = blockIdx.x + i * gridDim.x; no host synchronisation. TMA reads rows past an expert's end
// (the next expert's, never stored) and zero-fills past the tensor's end (K not a multiple of 128,
// the last rows); stores are guarded by row < off[e+1] and col < N. Epilogue: each consumer
// warpgroup's 64 rows of a tile, where all lie inside the expert, are staged in shared memory
// (128-byte swizzled strips) and written by TMA stores (TMA reduce-adds when accumulating) that
// drain while the warpgroup goes on; the rows of an expert's last, partial m-tile that are not a
// whole 64 are stored from registers.
//
// Launch: SM90_THREADS threads, grid = the number of SMs, dynamic shared memory SM90_SMEM_<tile>;
// tensor maps (cudaTensorMap2D, 128-byte swizzle): A u8 [rows, K] box {128, 128}; B u8 [E * N, K]
// box {128, BN}; C f32 [rows, N] box {32, 64} (BF16 storage: bf16, box {64, 64}). Requires K % 16 == 0 (the TMA row pitch), N % 8 == 0,
// E <= SM90_MAX_E and 16-byte-aligned A, B and C; the kernel traps for E > SM90_MAX_E.
//
// Wgrad (segments along K: dW[e] (+)= dY_e^T X_e, the tokens of expert e as the reduction) runs the
// same template with Segments::AlongK. wgmma reads FP8 operands K-major only, so the column-tiled
// operands (128x1 tiles restarted at each expert's first token) come as [cols, pitch] with each
// expert's tokens padded by zero codes to whole 128-token chunks: written so by quant_coltile and
// requant_coltile (their kpitch layout), or from their row-major codes [tokens, cols] by
// sm90_coltile_transpose (MOE8_SM90_KMAJOR=0); chunk g of that layout is chunk g of
// quant_coltile's scales ([chunks, cols]), so one chunk of A (dY^T, M rows) and B (X^T, N rows) has a
// per-row scale vector on both sides: promotion is acc += p * sa[row] * sb[col], the two vectors
// staged in shared memory by each consumer warpgroup one chunk ahead (named barriers). The tiles are static (E x M/128 x N/BN,
// expert-major; with `sorted` the experts largest first, dealt in a snake: sm90_tile), each with
// the K chunks of its expert; C is [E * M, N].

#define SM90_MAX_E 256
// Named barriers (0 is __syncthreads): 1-2 each consumer warpgroup's epilogue, 3-4 its Wgrad scale
// buffers, and the two turns of PINGPONG.
#define SM90_TURN_0 5
#define SM90_TURN_1 6
// STAGED_SCALES: ring stage s is released by named barrier SM90_STAGE_BAR + s (7 .. 10), and with
// FILL_BARRIER announced filled by SM90_FILL_BAR + s (11 .. 14).
#define SM90_STAGE_BAR 7
#define SM90_FILL_BAR 11
// LAG: warpgroup 1 starts its first chunk once warpgroup 0 has done its own.
#define SM90_LAG_BAR 15
#define SM90_THREADS 384  // two consumer warpgroups and the producer warpgroup
#define SM90_BM 128       // rows per tile (64 per consumer warpgroup)
// outMode: how C is stored (see the header).
#define SM90_OUT_F32 0
#define SM90_OUT_ROUND 1
#define SM90_OUT_BF16 2
// FP8 codes [rows, N] in C with one scale per row per 128 columns in Cs [rows, ceil(N/128)]: the f32
// result quantised in 1x128 tiles by qscale and quant_mul2 (fmt qfmt, amax or unit scaling qmode, eps
// qeps), the bits quant_tile128 writes for the f32 result (the FP8_OUT entry; N % 16 == 0).
#define SM90_OUT_FP8 3
// Dynamic shared memory of each entry point (static_asserts below check them against sm90_smem_bytes).
#define SM90_SMEM_128x256 216120
#define SM90_SMEM_128x128 199752
#define SM90_SMEM_WGRAD_128x256 222264
#define SM90_SMEM_WGRAD_128x128 203848
// The 128 x 256 Wgrad with each stage's scale vectors in the ring (STAGED_SCALES).
#define SM90_SMEM_WGRAD_128x256_STAGED 221752
// The deeper ring of the 128 x 128 entry for BF16 stores without accumulate, for at most
// SM90_MAX_E_DEEP experts (tables half the size): C staged as BF16 (half the bytes of f32) and six
// stages, which fill the 227 KB a CTA may have (the f32 entry has four).
#define SM90_MAX_E_DEEP 128
#define SM90_SMEM_128x128_BF16 231528
// The f32 and accumulating calls (the dense roles as one group) for at most SM90_MAX_E_DEEP experts:
// f32 staging and the small tables leave room for five stages.
#define SM90_SMEM_128x128_E128 231512

#include "sm90.cuh"
#include "gemm_sm90_parts.cuh"

// BF16_ONLY: the C staging holds BF16 (the entry stores BF16 and never accumulates; it traps
// otherwise); MAX_E: the experts its tables hold. PINGPONG (the one-buffer 128 x 256 loop): the two
// consumer warpgroups take turns issuing their halves' wgmmas, warpgroup 1 one half behind warpgroup
// 0, so that each one's promotion (and epilogue) runs while the other's wgmmas hold the tensor cores;
// issued together, both promote at once and the tensor cores idle through every promotion.
// STAGED_SCALES (the one-buffer Wgrad): the producer bulk-copies each chunk's two scale vectors (the
// tile's 128 rows of As' row g, its BN columns of Bs' row g: both contiguous) into the ring stage
// with the codes, on the same full barrier, and the consumers read them there instead of loading and
// staging them themselves each chunk. A stage is then released through a named barrier (the
// consumers arrive after their promotion, the producer warp waits before refilling it) rather than
// the empty mbarrier: the same order (racecheck still reports it, as it does not follow a release by
// bar.arrive: FILL_BARRIER's entry is the one it checks; notes/sm90-gemm.md).
// FILL_BARRIER (with STAGED_SCALES; the racecheck twin, MOE8_SM90_WGRAD_STAGED=checked): the loading
// warp writes the scale vectors itself (ordinary loads and stores after the stage's release, then
// lane 0's arrival on the full mbarrier for the codes' TMA loads); a second producer warp waits for
// the full mbarrier and then at named barrier SM90_FILL_BAR + s with the consumers, before they read
// the stage; and the consumers release a stage by waiting at its named barrier with the loading warp
// instead of arriving there. That orders nothing the default's mbarriers and arrivals do not, and it
// serialises producer and consumers; it makes every order one racecheck can follow, and puts no
// write racecheck cannot order (the async proxy's bulk copies: with them the twin reported 11-14
// hazards on 3 CTAs, all bulk copy against promotion, and 0 with the stores; notes/sm90-gemm.md,
// nineteenth and twentieth sessions), so that a hazard it reports is one in the ring's order.
// STRIPS (the staged Wgrad's; 0: off, or 64): the epilogue stores each 64-row strip of 128-byte rows
// as soon as it is written, into the next of its staging slots, instead of a 128-column half at a
// time with a wait in between for the last half's copies to read the staging (the wait that held 6%
// of the Wgrad's stall samples; notes/sm90-gemm.md, nineteenth session).
// LAG (the staged Wgrad, in place of PINGPONG's turns): warpgroup 1 starts one chunk behind
// warpgroup 0 and stays there (the ring's three stages allow it; nothing else couples the two), so
// that their epilogues, and their promotions, fall a chunk apart rather than together: gate_up
// Wgrad +1-4% in each of eight rounds (notes/sm90-gemm.md, twenty-second session).
template <int BN, int STAGES, Mainloop LOOP, Segments SEG, bool BF16_ONLY = false, int MAX_E = SM90_MAX_E,
          bool PINGPONG = false, bool STAGED_SCALES = false, bool FILL_BARRIER = false,
          int STRIPS = 0, bool LAG = false, bool STSM = false, bool LEAN = false, bool EARLY = false,
          bool FP8_OUT = false>
__device__ __forceinline__ void sm90_fp8_grouped(const CUtensorMap* tA, const CUtensorMap* tB, const CUtensorMap* tC,
                                                 const float* As, const float* Bs, float* C, const int* off, int E,
                                                 int M, int N, int K, int accumulate, int outMode, int rows,
                                                 bool sorted = false, float* Cs = nullptr, int qfmt = 0,
                                                 int qmode = 0, float qeps = 0.0f) {
  constexpr int BM = SM90_BM, NWG = BM / 64;
  constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128;
  constexpr int NH = BN / 128;  // 128-column halves of the tile, one m64n128 wgmma chain each
  constexpr int ACC = 64;       // f32 accumulators per thread per half (m64 x n128 over 128 threads)
  static_assert(BN == 128 || BN == 256, "BN is 128 or 256");
  static_assert(LOOP == Mainloop::OneBuffer || BN == 128, "two accumulator sets fit the registers at BN = 128 only");
  // Wgrad: per consumer warpgroup two buffers of a chunk's scales (its 64 rows of A, then BN columns
  // of B), after the C staging.
  // (STAGED_SCALES: per ring stage the tile's BM rows of A, then its BN columns of B.)
  static_assert(!STAGED_SCALES || (SEG == Segments::AlongK && LOOP == Mainloop::OneBuffer),
                "staged scales are the one-buffer Wgrad's");
  static_assert(!STAGED_SCALES || (SM90_STAGE_BAR + STAGES <= SM90_FILL_BAR && SM90_FILL_BAR + STAGES <= 16),
                "named barriers per stage");
  static_assert(!FILL_BARRIER || STAGED_SCALES, "the fill barrier announces staged scales");
  static_assert(!LAG || (STAGED_SCALES && !PINGPONG && !FILL_BARRIER),
                "the staged Wgrad lags instead of taking turns (its checked twin waits in step)");
  static_assert(!STSM || (BF16_ONLY && STRIPS == 0), "stmatrix stages the BF16 entries' halves");
  static_assert(!LEAN || (SEG == Segments::AlongM && LOOP == Mainloop::TwoBuffers) ||
                    (STAGED_SCALES && !PINGPONG && !FILL_BARRIER),
                "the lean descriptors are the two-buffer Fprop / Dgrad loop's and the staged Wgrad's");
  static_assert(!EARLY || (SEG == Segments::AlongM && LOOP == Mainloop::TwoBuffers),
                "the early chunks are the two-buffer Fprop / Dgrad loop's");
  static_assert(!FP8_OUT || (SEG == Segments::AlongM && !BF16_ONLY && BN == 128),
                "FP8 output: the 128 x 128 entries along M with f32 staging");
  constexpr int S_FLOATS = STAGED_SCALES ? BM + BN : 64 + BN;
  constexpr int S_BYTES = SEG != Segments::AlongK ? 0 : STAGED_SCALES ? STAGES * S_FLOATS * 4 : NWG * 2 * S_FLOATS * 4;
  // Staging per consumer warpgroup: 64 rows x 128 columns of f32 (or BF16).
  constexpr int C_BYTES = 64 * 128 * (BF16_ONLY ? 2 : 4);
  static_assert(STRIPS == 0 || STRIPS == 64, "strips of a warpgroup's 64 rows");
  extern __shared__ u8 sm90_dyn[];
  u8* base = sm90_dyn + ((1024 - (sm90_smem_u32(sm90_dyn) & 1023)) & 1023);
  if (E > MAX_E || (BF16_ONLY && (outMode != SM90_OUT_BF16 || accumulate)) ||
      (FP8_OUT && (outMode != SM90_OUT_FP8 || accumulate || N % 16 != 0 || qmode == SCALE_POW2)))
    asm volatile("trap;");
  u8* sA = base;
  u8* sB = base + STAGES * A_BYTES;
  u8* sC = sB + STAGES * B_BYTES;
  u8* sS = sC + NWG * C_BYTES;
  u64* full = (u64*)(sS + S_BYTES);
  u64* empty = full + STAGES;
  int* soff = (int*)(empty + STAGES);  // E + 1 offsets
  int* mpre = soff + MAX_E + 1;        // E + 1 prefix sums of m-tiles (of 128 rows: chunks along K)
  int* order = mpre + MAX_E + 1;       // along K: expert ids by falling chunk count (sm90_tile)

  // LEAN: the warp index and the tile count read back from lane 0 (as DeepGEMM does), so that ptxas
  // knows them warp-uniform: the branches on them and the ring's stage index carried across tiles
  // stay uniform, and the wgmma descriptors are built in uniform registers (no R2UR a wgmma).
  const int warp = LEAN ? __shfl_sync(0xffffffffu, threadIdx.x >> 5, 0) : threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4 * NWG);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  sm90_tables(off, E, soff, mpre, order, SEG == Segments::AlongK && sorted, warp, lane);

  const int NT = cdiv(N, BN), NB = cdiv(N, 128), KC = cdiv(K, 128);
  const int total0 = SEG == Segments::AlongM ? mpre[E] * NT : E * cdiv(M, BM) * NT;
  const int total = LEAN ? __shfl_sync(0xffffffffu, total0, 0) : total0;
  // (BF16 storage: a row of N BF16 values is N / 2 floats; N % 8 == 0.)
  if (SEG == Segments::AlongM && !accumulate)
    sm90_zero_uncovered(C, soff[0], soff[E], rows,
                        FP8_OUT ? N / 4 : outMode == SM90_OUT_BF16 ? N / 2 : N);
  // (FP8: a row of zeros quantises to code 0 with the scale of amax 0, which eps floors.)
  if constexpr (FP8_OUT)
    sm90_fill_uncovered(Cs, soff[0], soff[E], rows, cdiv(N, 128), qscale(0.0f, qeps, qfmt, qmode).scale);

  if (warp >= 4 * NWG) {
    // Producer warpgroup: one thread issues the TMA loads, the rest give their registers away.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    // (STAGED_SCALES: the whole warp, since it waits on named barriers; lane 0 issues.)
    if (warp == 4 * NWG && (STAGED_SCALES || lane == 0)) {
      constexpr int RELEASE = 32 + 128 * NWG;  // STAGED_SCALES: this warp and the consumers
      int s = 0, issued = 0;
      u32 ph = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const Sm90Tile T = sm90_tile<SEG, BN>(t, soff, mpre, order, sorted, E, M, N, KC);
        // The scale vectors' bytes (multiples of 64: M and N are multiples of 16).
        const u32 saBytes = STAGED_SCALES ? (u32)min(BM, M - T.aRow) * 4 : 0;
        const u32 sbBytes = STAGED_SCALES ? (u32)min(BN, N - T.n0) * 4 : 0;
        for (int kc = T.k0; kc < T.k0 + T.kc; kc++) {
          if constexpr (STAGED_SCALES) {
            if (issued >= STAGES) named_sync(SM90_STAGE_BAR + s, RELEASE);  // the stage's last use read
          } else {
            mbar_wait(&empty[s], ph ^ 1);
          }
          if constexpr (FILL_BARRIER) {
            // (lane 0's arrival below releases the warp's stores: __syncwarp orders them before it.)
            float* ss = (float*)sS + s * S_FLOATS;
            for (u32 i = lane; i < saBytes / 4; i += 32) ss[i] = As[(i64)kc * M + T.aRow + i];
            for (u32 i = lane; i < sbBytes / 4; i += 32) ss[BM + i] = Bs[(i64)kc * N + T.n0 + i];
            __syncwarp();
          }
          if (lane == 0) {
            mbar_expect_tx(&full[s], A_BYTES + B_BYTES + (FILL_BARRIER ? 0 : saBytes + sbBytes));
            tma_load_2d(sA + s * A_BYTES, tA, kc * 128, T.aRow, &full[s]);
            tma_load_2d(sB + s * B_BYTES, tB, kc * 128, T.bRow, &full[s]);
            if constexpr (STAGED_SCALES && !FILL_BARRIER) {
              float* ss = (float*)sS + s * S_FLOATS;
              bulk_load_1d(ss, As + (i64)kc * M + T.aRow, saBytes, &full[s]);
              bulk_load_1d(ss + BM, Bs + (i64)kc * N + T.n0, sbBytes, &full[s]);
            }
          }
          if constexpr (STAGED_SCALES) __syncwarp();
          issued++;
          if (++s == STAGES) s = 0, ph ^= 1;
        }
      }
      // Each used stage's last release is taken, so that no named barrier is left half-arrived: in
      // the order the consumers release them, oldest first (FILL_BARRIER's consumers wait there).
      if constexpr (STAGED_SCALES)
        for (int i = 0; i < min(issued, STAGES); i++)
          named_sync(SM90_STAGE_BAR + ((issued >= STAGES ? s : 0) + i) % STAGES, RELEASE);
    } else if (FILL_BARRIER && warp == 4 * NWG + 1) {
      // FILL_BARRIER: the next warp announces each fill once it is complete (the full mbarrier),
      // waiting at SM90_FILL_BAR + s with the consumers: a bar.sync on both sides, which racecheck
      // follows (an arrival it does not), and which the loading warp cannot take itself (it would
      // wait there for consumers that wait for its next release).
      int s = 0;
      u32 ph = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const Sm90Tile T = sm90_tile<SEG, BN>(t, soff, mpre, order, sorted, E, M, N, KC);
        for (int kc = 0; kc < T.kc; kc++) {
          mbar_wait(&full[s], ph);
          named_sync(SM90_FILL_BAR + s, 32 + 128 * NWG);
          if (++s == STAGES) s = 0, ph ^= 1;
        }
      }
    }
  } else {
  // Consumer warpgroup wg: rows 64 * wg .. of the tile; this thread: rows g and g + 8 of its warp's 16.
  // 232 registers per consumer thread after the producer's release (65536 per SM, one CTA per SM).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp >> 2, g = lane >> 2, tq = lane & 3;
  const int wrow = 16 * (warp & 3) + g;  // row of accumulators i & 2 == 0 within the warpgroup's 64
  const int rloc = 64 * wg + wrow;
  const u32 aBase = sm90_smem_u32(sA + wg * 64 * 128), bBase = sm90_smem_u32(sB);
  const u32 csBase = sm90_smem_u32(sC);
  int s = 0, sc = 0;  // ring stage; Wgrad's scale buffer
  u32 ph = 0;
  // PINGPONG's turns (named barriers of both warpgroups: one side arrives, the other waits):
  // warpgroup 1 issues a half once warpgroup 0 has issued it (SM90_TURN_1), warpgroup 0 the next
  // half once warpgroup 1 has issued this one (SM90_TURN_0); warpgroup 1 grants the first turn here.
  static_assert(!PINGPONG || LOOP == Mainloop::OneBuffer, "turns are taken by the one-buffer loop");
  if constexpr (PINGPONG)
    if (wg == 1) named_arrive(SM90_TURN_0, 256);
  // One half's wgmmas into p (in turn under PINGPONG).
  auto mma_half = [&](float (&p)[ACC], u32 aAddr, u32 bAddr) {
    if constexpr (PINGPONG) named_sync(wg ? SM90_TURN_1 : SM90_TURN_0, 256);
    if constexpr (LEAN) mma_chunk_lo(p, aAddr >> 4, bAddr >> 4);
    else mma_chunk(p, aAddr, bAddr);
    if constexpr (PINGPONG) named_arrive(wg ? SM90_TURN_0 : SM90_TURN_1, 256);
  };
  // Stores the accumulators of tile P (rows row0 .. rowEnd - 1 of C from row0, columns n0 ..).
  // Along M it runs once the next tile's first wgmmas are issued (deferred: the tensor cores work
  // while this warpgroup stores); the CTA's last tile waits for its copies to read the staging.
  struct Done {
    int row0, rowEnd, n0;
    bool last;
  };
  float acc[NH][ACC];
  int nstrip = 0;  // STRIPS: strips this warpgroup has staged, across its tiles (slot nstrip % SLOTS)
  auto zero_acc = [&]() {
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
      for (int i = 0; i < ACC; i++) acc[h][i] = 0.0f;
  };
  auto epilogue = [&](const Done& P) {
    const int row0 = P.row0, rowEnd = P.rowEnd, n0 = P.n0;
    const bool last = P.last;
    const int r0 = row0 + rloc, r1 = r0 + 8;
    const bool bf16 = BF16_ONLY || outMode == SM90_OUT_BF16;
    if (outMode == SM90_OUT_ROUND) {
#pragma unroll
      for (int h = 0; h < NH; h++)
#pragma unroll
        for (int i = 0; i < ACC; i++) acc[h][i] = round_bf16(acc[h][i]);
    }
    // FP8_OUT: each row's 128 columns of a half are one 1x128 tile, held by the four threads of a
    // quad (tq): their amax (columns inside N), its scale (into Cs, by tq 0) and each pair's codes.
    QScale qs[NH][2];
    if constexpr (FP8_OUT) {
      const int NBq = cdiv(N, 128);
#pragma unroll
      for (int h = 0; h < NH; h++) {
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++)
          if (n0 + 128 * h + 8 * j + 2 * tq < N) {
            a0 = amax_add(amax_add(a0, acc[h][4 * j]), acc[h][4 * j + 1]);
            a1 = amax_add(amax_add(a1, acc[h][4 * j + 2]), acc[h][4 * j + 3]);
          }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          a0 = fmaxf(a0, __shfl_xor_sync(0xffffffffu, a0, o));
          a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, o));
        }
        qs[h][0] = qscale(a0, qeps, qfmt, qmode);
        qs[h][1] = qscale(a1, qeps, qfmt, qmode);
        const int nb = n0 / 128 + h;
        if (tq == 0 && nb < NBq) {
          if (r0 < rowEnd) Cs[(i64)r0 * NBq + nb] = qs[h][0].scale;
          if (r1 < rowEnd) Cs[(i64)r1 * NBq + nb] = qs[h][1].scale;
        }
      }
    }
    // The codes of accumulators i, i + 1 (one row: hh) as a little-endian pair: quant_value's by
    // the amax and unit scalings' one path (quant_mul4's; power-of-two scales are refused above).
    auto codes2 = [&](int h, int hh, int i) -> u32 { return quant_mul2(acc[h][i], acc[h][i + 1], qs[h][hh].factor, qfmt); };

    // Epilogue, per 128-column half h: accumulator i is row (i & 2 ? g + 8 : g), column
    // n0 + 128 h + 8 (i / 4) + 2 tq + (i & 1).
    if (row0 + 64 * wg + 64 <= rowEnd) {
      // This warpgroup's 64 rows inside the expert (both warpgroups' in a whole tile; the first's
      // alone in an expert's last tile of 64 to 127 rows): stage its 64 x 128 in 128-byte strips with the TMA
      // 128-byte swizzle (16-byte chunk index ^= row & 7: conflict-free), then TMA-store the strips
      // (TMA-add them when accumulating: C = C + v in L2, the one write of each element).
      // BF16 storage: 64 columns per strip (cvt.rn.bf16x2 pairs), 32 for f32, 128 for FP8 codes.
      const bool leader = (threadIdx.x & 127) == 0;
      const u32 cs = csBase + (threadIdx.x >> 7) * C_BYTES;
      const int cw = FP8_OUT ? 128 : bf16 ? 64 : 32, esz = FP8_OUT ? 1 : bf16 ? 2 : 4;
      // Byte cb of row r of a strip at `strip`, in the TMA's 128-byte swizzle.
      auto swizzled = [](u32 strip, int r, int cb) { return strip + r * 128 + (((cb >> 4) ^ (r & 7)) << 4) + (cb & 15); };
      // One value pair into row r of a strip at `strip`, byte cb of its 128-byte row.
      auto stage = [&](u32 strip, int r, int cb, float v0, float v1) {
        const u32 p = swizzled(strip, r, cb);
        if (bf16) asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(p), "r"(sm90_pack_bf16(v0, v1)) : "memory");
        else asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(p), "f"(v0), "f"(v1) : "memory");
      };
      // FP8_OUT: a pair of codes (codes2) into row r of the half's one strip, byte cb.
      auto stage8 = [&](u32 strip, int r, int cb, u32 pair) {
        asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(swizzled(strip, r, cb)), "h"((u16)pair) : "memory");
      };
      if constexpr (STRIPS) {
        // Strip k goes to slot k % SLOTS and is stored once written; before the barrier that lets
        // the warpgroup write strip k + 1, its leader waits until the store SLOTS strips before it
        // has read that slot (the copies of the SLOTS - 2 strips between may still read).
        constexpr int SLOTS = C_BYTES / (64 * 128), SLOT_BYTES = STRIPS * 128;
        static_assert(SLOTS >= 2, "two staging slots at least");
        const int crow = row0 + 64 * wg;  // the strip's first row of C
#pragma unroll
        for (int h = 0; h < NH; h++)
#pragma unroll
          for (int j = 0; j < 16; j++) {
            const int col = 8 * j + 2 * tq, cb = (col % cw) * esz;  // byte in the strip's 128-byte row
            const u32 slot = cs + (nstrip % SLOTS) * SLOT_BYTES;
#pragma unroll
            for (int hh = 0; hh < 2; hh++) stage(slot, wrow + 8 * hh, cb, acc[h][4 * j + 2 * hh], acc[h][4 * j + 2 * hh + 1]);
            if ((8 * j + 8) % cw != 0) continue;  // the strip's last columns are written
            fence_async_smem();
            if (leader) bulk_wait_read_but<SLOTS - 2>();
            named_sync(1 + wg, 128);
            if (leader) {
              const int c0 = n0 + 128 * h + 8 * j + 8 - cw;
              if (c0 < N) {
                if (accumulate) tma_reduce_add_2d(tC, slot, c0, crow);
                else tma_store_2d(tC, slot, c0, crow);
              }
              bulk_commit();
              if (last && h == NH - 1 && j == 15) bulk_wait_all();  // read before the CTA exits
            }
            nstrip++;
          }
      } else {
#pragma unroll
        for (int h = 0; h < NH; h++) {
          const int nh = n0 + 128 * h;
          if (leader) bulk_wait_read();  // the previous stores have read the staging buffer
          named_sync(1 + wg, 128);
          if constexpr (STSM) {
            // BF16 by stmatrix: one instruction stores the warp's 16 rows of two 8-column blocks (j,
            // j + 1), 4 pairs a thread, where 32 st.shared.b32 a thread took one pair each. This
            // thread addresses row (lane & 7) + 8 ((lane >> 3) & 1) of the warp's 16, in block
            // j + (lane >> 4): 16 bytes, chunk (j % 8 + (lane >> 4)) ^ (row & 7) of the 64-column
            // strip j / 8 (the TMA's 128-byte swizzle, as `stage` writes it; row & 7 = lane & 7).
            const int q = lane & 7, hi = lane >> 4;
            const u32 rowAddr = cs + (16 * (warp & 3) + 8 * ((lane >> 3) & 1) + q) * 128;
#pragma unroll
            for (int j = 0; j < 16; j += 2)
              stmatrix_x4(rowAddr + (j >> 3) * 64 * 128 + ((((j & 7) + hi) ^ q) << 4),
                          sm90_pack_bf16(acc[h][4 * j], acc[h][4 * j + 1]),
                          sm90_pack_bf16(acc[h][4 * j + 2], acc[h][4 * j + 3]),
                          sm90_pack_bf16(acc[h][4 * j + 4], acc[h][4 * j + 5]),
                          sm90_pack_bf16(acc[h][4 * j + 6], acc[h][4 * j + 7]));
          } else {
#pragma unroll
            for (int j = 0; j < 16; j++) {
              const int col = 8 * j + 2 * tq, strip = col / cw, cb = (col % cw) * esz;  // byte in the 128-byte row
#pragma unroll
              for (int hh = 0; hh < 2; hh++)
                if constexpr (FP8_OUT) stage8(cs, wrow + 8 * hh, cb, codes2(h, hh, 4 * j + 2 * hh));
                else stage(cs + strip * 64 * 128, wrow + 8 * hh, cb, acc[h][4 * j + 2 * hh], acc[h][4 * j + 2 * hh + 1]);
            }
          }
          fence_async_smem();
          named_sync(1 + wg, 128);
          if (leader) {
            for (int st = 0; st < 128 / cw; st++)
              if (nh + st * cw < N) {
                if (accumulate) tma_reduce_add_2d(tC, cs + st * 64 * 128, nh + st * cw, row0 + 64 * wg);
                else tma_store_2d(tC, cs + st * 64 * 128, nh + st * cw, row0 + 64 * wg);
              }
            bulk_commit();
            // The CTA's last tile: the copies must have read the staging buffer before the CTA exits
            // (a wait after the loop instead makes ptxas cap the consumers' registers below setmaxnreg).
            if (last && h == NH - 1) bulk_wait_all();
          }
        }
      }
      return;
    }
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
      for (int j = 0; j < 16; j++) {
        const int col = n0 + 128 * h + 8 * j + 2 * tq;
        if (col >= N) continue;
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
          const int r = hh ? r1 : r0;
          if (r >= rowEnd) continue;
          const float v0 = acc[h][4 * j + 2 * hh], v1 = acc[h][4 * j + 2 * hh + 1];
          if constexpr (FP8_OUT) {
            *(u16*)((u8*)C + (i64)r * N + col) = (u16)codes2(h, hh, 4 * j + 2 * hh);
            continue;
          }
          if (bf16) {
            *(u32*)((u16*)C + (i64)r * N + col) = sm90_pack_bf16(v0, v1);
            continue;
          }
          float2* c = (float2*)(C + (i64)r * N + col);
          float2 v = make_float2(v0, v1);
          if (accumulate) {
            const float2 o = *c;
            v = make_float2(o.x + v.x, o.y + v.y);
          }
          *c = v;
        }
      }
    if ((threadIdx.x & 127) == 0 && last) bulk_wait_all();
  };
  // Deferred epilogues along M with 128-column tiles only: at 128 x 256 the stores' registers next
  // to two accumulator halves and the wgmmas' in flight spill (ptxas: 2.4 KB).
  constexpr bool DEFER = SEG == Segments::AlongM && BN == 128;
  Done pend{0, 0, 0, false};
  // LAG: this warpgroup has taken (1) or given (0) the lag barrier. Both warpgroups run the same
  // chunks, so either both take part or neither does.
  bool lagged = false;
  bool pending = false;  // pend's tile is computed but not stored (DEFER)
  // The first chunk's wgmmas of an along-M tile are in flight: store the previous tile, then clear.
  auto flush = [&]() {
    if constexpr (DEFER) {
      if (pending) epilogue(pend);
      pending = false;
    }
    zero_acc();
  };
  // Tile u's fields (LEAN: read back from lane 0, warp-uniform to ptxas).
  auto tile_of = [&](int u) {
    const Sm90Tile T0 = sm90_tile<SEG, BN>(u, soff, mpre, order, sorted, E, M, N, KC);
    return LEAN ? sm90_tile_uniform(T0) : T0;
  };
  // EARLY: the next tile's fields are found while this tile's first wgmmas run, not between its
  // last wgmma and the next tile's first, where the expert's bisection (a chain of shared-memory
  // loads, through R2UR under LEAN) leaves the tensor cores idle once a tile: at K = 256 (two
  // chunks a tile) LEAN alone measured 11% slower than without (notes/sm90-gemm.md, twenty-ninth
  // session). Past the last tile it finds a tile that is never used (the bisection stays in E).
  Sm90Tile ahead{};
  if constexpr (EARLY) ahead = tile_of(blockIdx.x);
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const Sm90Tile T = EARLY ? ahead : tile_of(t);
    const int e = T.e, row0 = T.cRow, rowEnd = T.rowEnd, n0 = T.n0;
    const int r0 = row0 + rloc, r1 = r0 + 8;
    // Scales of this thread's two rows and of the B blocks (32-bit offsets: fewer live registers).
    // Half h of the tile (columns n0 + 128 h ..) uses B block n0 / 128 + h (clamped: a half past N
    // computes values that are never stored).
    const u32 ia0 = (u32)min(r0, rowEnd - 1) * KC, ia1 = (u32)min(r1, rowEnd - 1) * KC;
    const float* as0 = As + ia0;
    const float* as1 = As + ia1;
    const float* bs = Bs + ((u32)e * NB + n0 / 128) * KC;
    const int bs1 = (n0 / 128 + 1 < NB ? KC : 0);  // offset of the second half's B scales

    const bool last = t + (int)gridDim.x >= total;
    if constexpr (SEG == Segments::AlongK) {
      zero_acc();
      // The chunk's scales reach shared memory through the warpgroup itself: each thread loads its
      // share from global memory (A's row aRow + 64 wg + tid, B's columns n0 + tid, + 128) one chunk
      // ahead, stores it into the buffer the next chunk reads, and a named barrier of the
      // warpgroup's 128 threads per chunk orders those stores before the reads and the reads of a
      // buffer before its next stores (two chunks later: the chunk between has its barrier). The
      // chunk counter `sc` runs on across tiles, so the buffers alternate at every chunk.
      const int tid = threadIdx.x & 127;
      const int ra = min(T.aRow + 64 * wg + tid, M - 1);
      auto load = [&](int kc, float (&v)[1 + BN / 128]) {
        const i64 g = T.k0 + kc;  // the chunk's row of As [chunks, M] and Bs [chunks, N]
        v[0] = tid < 64 ? __ldg(As + g * M + ra) : 0.0f;
#pragma unroll
        for (int c = 0; c < BN / 128; c++) v[1 + c] = __ldg(Bs + g * N + min(n0 + tid + 128 * c, N - 1));
      };
      auto store = [&](const float (&v)[1 + BN / 128], float* buf) {
        if (tid < 64) buf[tid] = v[0];
#pragma unroll
        for (int c = 0; c < BN / 128; c++) buf[64 + tid + 128 * c] = v[1 + c];
      };
      float* bufs = (float*)sS + wg * 2 * S_FLOATS;
      float v[1 + BN / 128];
      if (!STAGED_SCALES && T.kc > 0) {
        load(0, v);
        store(v, bufs + sc * S_FLOATS);
      }
      if constexpr (LOOP == Mainloop::TwoBuffers) {
        // Chunk kc + 1's wgmmas are issued before chunk kc is promoted (wait_group 1), so the
        // promotion's multiplies overlap the tensor cores. pa holds chunk kc (from stage sta), pb
        // receives chunk kc + 1 (stage stb); the scale buffers work as in the one-buffer loop.
        // The loop has no branch around a wgmma (ptxas serialises wgmmas in a path it cannot prove
        // uniform): chunks in pairs, then the one or two left.
        float p0[ACC], p1[ACC];
        const int n = T.kc;
        auto issue = [&](float (&p)[ACC]) {
          const int st = s;
          mbar_wait(&full[s], ph);
          mma_chunk(p, aBase + s * A_BYTES, bBase + s * B_BYTES);
          if (++s == STAGES) s = 0, ph ^= 1;
          return st;
        };
        // Promotes chunk kc from p (stage st) once its wgmmas are done (`pending` groups may stay).
        auto finish = [&](int kc, float (&p)[ACC], int st) {
          if (lane == 0) mbar_arrive(&empty[st]);
          const float* buf = bufs + sc * S_FLOATS;
          promote_cols(acc[0], p, buf[wrow], buf[wrow + 8], buf + 64 + 2 * tq);
          sc ^= 1;
          if (kc + 1 < n) store(v, bufs + sc * S_FLOATS);
        };
        if (n > 0) {
          int st0 = issue(p0), st1 = 0, kc = 0;
          for (; kc + 2 < n; kc += 2) {
            named_sync(3 + wg, 128);  // chunk kc's scales stored; the other buffer's reads done
            load(kc + 1, v);
            st1 = issue(p1);
            wgmma_wait<1>();
            finish(kc, p0, st0);
            named_sync(3 + wg, 128);
            load(kc + 2, v);
            st0 = issue(p0);
            wgmma_wait<1>();
            finish(kc + 1, p1, st1);
          }
          named_sync(3 + wg, 128);
          if (kc + 1 < n) {  // two chunks left: kc in p0, kc + 1 into p1
            load(kc + 1, v);
            st1 = issue(p1);
            wgmma_wait<1>();
            finish(kc, p0, st0);
            named_sync(3 + wg, 128);
            wgmma_wait<0>();
            finish(kc + 1, p1, st1);
          } else {  // one chunk left, in p0
            wgmma_wait<0>();
            finish(kc, p0, st0);
          }
        }
      } else if constexpr (STAGED_SCALES) {
        // The chunk's scales in its stage: this thread's two rows of A, its columns of B; rowsIn and
        // colsIn of them were copied (the tile's rows inside M, its columns inside N).
        float p[ACC];
        const int rowsIn = M - T.aRow, colsIn = N - n0;
        for (int kc = 0; kc < T.kc; kc++) {
          if constexpr (LAG)
            if (wg == 1 && !lagged) named_sync(SM90_LAG_BAR, 256), lagged = true;
          mbar_wait(&full[s], ph);
          if constexpr (FILL_BARRIER) named_sync(SM90_FILL_BAR + s, 32 + 128 * NWG);
          const float* ss = (const float*)sS + s * S_FLOATS;
          // Only the scales this fill copied are read: the tile's rows past M and columns past N
          // (never stored) take 0 rather than what an earlier tile's fill left in the stage.
          const float sa0 = rloc < rowsIn ? ss[rloc] : 0.0f, sa1 = rloc + 8 < rowsIn ? ss[rloc + 8] : 0.0f;
#pragma unroll
          for (int h = 0; h < NH; h++) {
            mma_half(p, aBase + s * A_BYTES, bBase + s * B_BYTES + h * 128 * 128);
            const float* sb = ss + BM + 128 * h + 2 * tq;
            const int live = colsIn - 128 * h;  // columns of this half inside N (a multiple of 16)
            wgmma_wait<0>();
            if (live >= 128) promote_cols(acc[h], p, sa0, sa1, sb);
            else if (live > 0) promote_cols_part(acc[h], p, sa0, sa1, sb, live - 2 * tq);
          }
          // Every read of the stage done (FILL_BARRIER: waiting with the producer, an order racecheck
          // follows whether or not it models an arrival as a release).
          if constexpr (FILL_BARRIER) named_sync(SM90_STAGE_BAR + s, 32 + 128 * NWG);
          else named_arrive(SM90_STAGE_BAR + s, 32 + 128 * NWG);
          if (++s == STAGES) s = 0, ph ^= 1;
          if constexpr (LAG)
            if (wg == 0 && !lagged) named_arrive(SM90_LAG_BAR, 256), lagged = true;
        }
      } else {
      float p[ACC];
      for (int kc = 0; kc < T.kc; kc++) {
        const float* buf = bufs + sc * S_FLOATS;
        named_sync(3 + wg, 128);  // this chunk's scales stored; the other buffer's reads done
        if (kc + 1 < T.kc) load(kc + 1, v);
        mbar_wait(&full[s], ph);
        const float sa0 = buf[wrow], sa1 = buf[wrow + 8];
#pragma unroll
        for (int h = 0; h < NH; h++) {
          mma_half(p, aBase + s * A_BYTES, bBase + s * B_BYTES + h * 128 * 128);
          wgmma_wait<0>();
          if (h == NH - 1 && lane == 0) mbar_arrive(&empty[s]);
          promote_cols(acc[h], p, sa0, sa1, buf + 64 + 128 * h + 2 * tq);
        }
        sc ^= 1;
        if (kc + 1 < T.kc) store(v, bufs + sc * S_FLOATS);
        if (++s == STAGES) s = 0, ph ^= 1;
      }
      }
    } else if constexpr (LOOP == Mainloop::OneBuffer) {
      float p[ACC];
      for (int kc = 0; kc < KC; kc++) {
        const float sa0 = __ldg(as0 + kc), sa1 = __ldg(as1 + kc), sb0 = __ldg(bs + kc);
        const float sb1 = NH > 1 ? __ldg(bs + bs1 + kc) : 0.0f;
        mbar_wait(&full[s], ph);
#pragma unroll
        for (int h = 0; h < NH; h++) {
          mma_half(p, aBase + s * A_BYTES, bBase + s * B_BYTES + h * 128 * 128);
          if (h == 0 && kc == 0) flush();
          wgmma_wait<0>();
          if (h == NH - 1 && lane == 0) mbar_arrive(&empty[s]);
          promote(acc[h], p, sa0, sa1, h ? sb1 : sb0);
        }
        if (++s == STAGES) s = 0, ph ^= 1;
      }
    } else {
      // Two accumulator sets: chunk kc's wgmmas are issued before chunk kc-1 is promoted (wait_group 1).
      float p0[ACC], p1[ACC];
      // One chunk's wgmmas from stage s (LEAN: from the descriptors' low words).
      auto chunk = [&](float (&p)[ACC]) {
        if constexpr (LEAN) mma_chunk_lo(p, (aBase >> 4) + s * (A_BYTES >> 4), (bBase >> 4) + s * (B_BYTES >> 4));
        else mma_chunk(p, aBase + s * A_BYTES, bBase + s * B_BYTES);
      };
      float a00 = __ldg(as0), a01 = __ldg(as1), b0 = __ldg(bs), a10 = 0.f, a11 = 0.f, b1 = 0.f;
      int st0 = s, st1 = 0;
      // Chunk kc's scales and stage, and its wgmmas into p (the loop's issue step).
      auto issue = [&](float (&p)[ACC], int kc, float& sa0, float& sa1, float& sb, int& st) {
        sa0 = __ldg(as0 + kc), sa1 = __ldg(as1 + kc), sb = __ldg(bs + kc);
        st = s;
        mbar_wait(&full[s], ph);
        chunk(p);
        if (++s == STAGES) s = 0, ph ^= 1;
      };
      // Waits until one chunk (drain: none) is in flight, releases stage st and promotes p.
      auto retire = [&](float (&p)[ACC], int st, float sa0, float sa1, float sb, bool drain) {
        if (drain) wgmma_wait<0>();
        else wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st]);
        promote(acc[0], p, sa0, sa1, sb);
      };
      if constexpr (EARLY) {
        // EARLY: chunks 0 and 1 are both issued before the previous tile's epilogue, so that the
        // tensor cores have two chunks of work while it runs, not one: at K = 256 (two chunks a
        // tile) the second was otherwise issued only after the stores, and the tensor cores idled
        // once a tile. The loop then runs in pairs from chunk 1 in flight in p1.
        mbar_wait(&full[s], ph);
        chunk(p0);
        if (++s == STAGES) s = 0, ph ^= 1;
        ahead = tile_of(t + (int)gridDim.x);
        if (KC > 1) issue(p1, 1, a10, a11, b1, st1);
        flush();
        if (KC == 1) {
          retire(p0, st0, a00, a01, b0, true);
        } else {
          retire(p0, st0, a00, a01, b0, false);
          int kc = 2;
          for (; kc + 1 < KC; kc += 2) {
            issue(p0, kc, a00, a01, b0, st0);
            retire(p1, st1, a10, a11, b1, false);
            issue(p1, kc + 1, a10, a11, b1, st1);
            retire(p0, st0, a00, a01, b0, false);
          }
          if (kc < KC) {  // one chunk left (KC odd): into p0, then drain both
            issue(p0, kc, a00, a01, b0, st0);
            retire(p1, st1, a10, a11, b1, false);
            retire(p0, st0, a00, a01, b0, true);
          } else {
            retire(p1, st1, a10, a11, b1, true);
          }
        }
      } else {
      mbar_wait(&full[s], ph);
      chunk(p0);
      if (++s == STAGES) s = 0, ph ^= 1;
      flush();
      int kc = 1;
      for (; kc + 1 < KC; kc += 2) {
        a10 = __ldg(as0 + kc), a11 = __ldg(as1 + kc), b1 = __ldg(bs + kc);
        st1 = s;
        mbar_wait(&full[s], ph);
        chunk(p1);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote(acc[0], p0, a00, a01, b0);
        a00 = __ldg(as0 + kc + 1), a01 = __ldg(as1 + kc + 1), b0 = __ldg(bs + kc + 1);
        st0 = s;
        mbar_wait(&full[s], ph);
        chunk(p0);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st1]);
        promote(acc[0], p1, a10, a11, b1);
      }
      if (kc < KC) {  // one chunk left (KC even): into p1, then drain both
        a10 = __ldg(as0 + kc), a11 = __ldg(as1 + kc), b1 = __ldg(bs + kc);
        st1 = s;
        mbar_wait(&full[s], ph);
        chunk(p1);
        if (++s == STAGES) s = 0, ph ^= 1;
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote(acc[0], p0, a00, a01, b0);
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[st1]);
        promote(acc[0], p1, a10, a11, b1);
      } else {  // KC odd: p0 holds the last chunk
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[st0]);
        promote(acc[0], p0, a00, a01, b0);
      }
      }
    }
    if constexpr (DEFER) {
      pend = {row0, rowEnd, n0, last};
      pending = true;
    } else {
      epilogue({row0, rowEnd, n0, last});
    }
  }
  if constexpr (DEFER)
    if (pending) epilogue(pend);
  // PINGPONG: warpgroup 1's arrival after its last half (or its first grant, if it issued none) is
  // taken, so that no barrier is left half-arrived.
  if constexpr (PINGPONG)
    if (wg == 0) named_sync(SM90_TURN_0, 256);

  }  // consumer
}

static_assert(sm90_smem_bytes(256, 3, false) == SM90_SMEM_128x256, "SM90_SMEM_128x256");
static_assert(sm90_smem_bytes(128, 4, false) == SM90_SMEM_128x128, "SM90_SMEM_128x128");
static_assert(sm90_smem_bytes(256, 3, true) == SM90_SMEM_WGRAD_128x256, "SM90_SMEM_WGRAD_128x256");
static_assert(sm90_smem_bytes(128, 4, true) == SM90_SMEM_WGRAD_128x128, "SM90_SMEM_WGRAD_128x128");
static_assert(sm90_smem_bytes(256, 3, true, false, SM90_MAX_E, true) == SM90_SMEM_WGRAD_128x256_STAGED,
              "SM90_SMEM_WGRAD_128x256_STAGED");
static_assert(sm90_smem_bytes(128, 6, false, true, SM90_MAX_E_DEEP) == SM90_SMEM_128x128_BF16,
              "SM90_SMEM_128x128_BF16");
static_assert(sm90_smem_bytes(128, 5, false, false, SM90_MAX_E_DEEP) == SM90_SMEM_128x128_E128,
              "SM90_SMEM_128x128_E128");
static_assert(SM90_SMEM_128x128_BF16 <= 227 * 1024, "a CTA's dynamic shared memory on sm_90");
static_assert(SM90_SMEM_128x128_E128 <= 227 * 1024, "a CTA's dynamic shared memory on sm_90");

// Entry points, one signature: tensor maps of A, B and C, the scales, C, the expert offsets, sizes
// (rows: of A and C).
#define GEMM_SM90_ENTRY(NAME, BN, STAGES, LOOP, BF16_ONLY, MAX_E, PINGPONG)                                       \
  KERNEL void __launch_bounds__(SM90_THREADS, 1)                                                                  \
      NAME(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tB,                        \
           const __grid_constant__ CUtensorMap tC, const float* As, const float* Bs, float* C, const int* off,     \
           int E, int N, int K, int accumulate, int outMode, int rows) {                                          \
    sm90_fp8_grouped<BN, STAGES, Mainloop::LOOP, Segments::AlongM, BF16_ONLY, MAX_E, PINGPONG>(                  \
        &tA, &tB, &tC, As, Bs, C, off, E, 0, N, K, accumulate, outMode, rows);                                    \
  }
// The deep rings' 128 x 128 two-buffer entries as they run by default (up to SM90_MAX_E_DEEP groups):
// STSM (the BF16 staging by stmatrix), LEAN (warp-uniform control and low-word descriptors) and
// EARLY (the next tile found, and its first two chunks issued, before the last tile's epilogue).
#define GEMM_SM90_EARLY_ENTRY(NAME, STAGES, BF16_ONLY)                                                             \
  KERNEL void __launch_bounds__(SM90_THREADS, 1)                                                                  \
      NAME(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tB,                        \
           const __grid_constant__ CUtensorMap tC, const float* As, const float* Bs, float* C, const int* off,     \
           int E, int N, int K, int accumulate, int outMode, int rows) {                                          \
    sm90_fp8_grouped<128, STAGES, Mainloop::TwoBuffers, Segments::AlongM, BF16_ONLY, SM90_MAX_E_DEEP, false, false, \
                     false, 0, false, BF16_ONLY, true, true>(&tA, &tB, &tC, As, Bs, C, off, E, 0, N, K, accumulate, \
                                                           outMode, rows);                                        \
  }
// K >= 512 (gate/up Fprop, down Dgrad in `small`): 128 x 256 tiles, 25% less L2 traffic per FLOP.
GEMM_SM90_ENTRY(gemm_sm90_fp8_grouped_128x256, 256, 3, OneBuffer, false, SM90_MAX_E, false)
// The same, the two consumer warpgroups taking turns (PINGPONG; MOE8_SM90_BN=256 picks these).
GEMM_SM90_ENTRY(gemm_sm90_fp8_grouped_128x256_pingpong, 256, 3, OneBuffer, false, SM90_MAX_E, true)
// Short K (down Fprop, K = 256: two chunks per tile): 128 x 128 tiles, four stages, two buffers.
// (notes/sm90-gemm.md measured five stages 2% faster, but only without the alignment pad, which
// made the kernel depend on where the driver places the dynamic shared memory.)
GEMM_SM90_ENTRY(gemm_sm90_fp8_grouped_128x128, 128, 4, TwoBuffers, false, SM90_MAX_E, false)
// BF16 stores without accumulate for up to 128 experts (the model's Fprop and Dgrad): six stages,
// so the producer runs further ahead across tile switches (short K: a tile's fixed cost dominates;
// notes/sm90-gemm.md, "Deeper rings"): gate/up Fprop 680 -> 789 TFLOP/s, down Fprop 343 -> 383.
// The default before the early entry below (MOE8_SM90_FPROP=plain, for measuring the two).
GEMM_SM90_ENTRY(gemm_sm90_fp8_grouped_128x128_bf16, 128, 6, TwoBuffers, true, SM90_MAX_E_DEEP, false)
// The same with STSM, LEAN and EARLY, the default: at small's expert shapes, balanced groups, +8-10%
// on gate_up Fprop and Dgrad and on down Fprop, +1% on down Dgrad (notes/sm90-gemm.md, twenty-ninth
// session). Without EARLY, STSM and LEAN gained 9% on gate_up Fprop and lost 11% on down Fprop.
GEMM_SM90_EARLY_ENTRY(gemm_sm90_fp8_grouped_128x128_bf16_early, 6, true)
// Every other call (f32 stores, accumulate-into: the dense roles as one group) for up to 128
// experts: five stages (the step's GEMMs 20.7 -> 19.9 GPU ms; notes/sm90-gemm.md); the default
// before the early entry below (MOE8_SM90_FPROP=plain).
GEMM_SM90_ENTRY(gemm_sm90_fp8_grouped_128x128_e128, 128, 5, TwoBuffers, false, SM90_MAX_E_DEEP, false)
// The same with LEAN and EARLY, the default.
GEMM_SM90_EARLY_ENTRY(gemm_sm90_fp8_grouped_128x128_e128_early, 5, false)
// FP8 output (SM90_OUT_FP8): the early 5-stage entry's loop, each tile stored as E4M3 / E5M2 codes
// Q [rows, N] (one 128-byte strip of 64 rows a half: tensor map u8, box {128, 64}) with its 1x128
// scales Qs [rows, ceil(N/128)] written from the registers.
KERNEL void __launch_bounds__(SM90_THREADS, 1)
    gemm_sm90_fp8_grouped_128x128_fp8out(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tB,
                                         const __grid_constant__ CUtensorMap tC, const float* As, const float* Bs,
                                         u8* Q, float* Qs, const int* off, int E, int N, int K, int rows, int qfmt,
                                         int qmode, float qeps) {
  sm90_fp8_grouped<128, 5, Mainloop::TwoBuffers, Segments::AlongM, false, SM90_MAX_E_DEEP, false, false, false, 0,
                   false, false, true, true, true>(&tA, &tB, &tC, As, Bs, (float*)Q, off, E, 0, N, K, 0, SM90_OUT_FP8,
                                                   rows, false, Qs, qfmt, qmode, qeps);
}

// Wgrad: dW[e] (+)= A_e B_e^T with A = dY^T [M, pitch] and B = X^T [N, pitch] as sm90_coltile_transpose
// writes them (tensor maps: A u8 [M, pitch] box {128, 128}, B u8 [N, pitch] box {128, BN}, C f32
// [E * M, N] box {32, 64}); As [chunks, M] and Bs [chunks, N] are quant_coltile's scales. Requires
// M % 16 == 0 and N % 16 == 0 (the transposes' 16-byte pieces).
#define GEMM_SM90_WGRAD_ENTRY(NAME, BN, STAGES, LOOP, PINGPONG, STAGED, FILL, STRIPS, LAG)                       \
  KERNEL void __launch_bounds__(SM90_THREADS, 1)                                                                 \
      NAME(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tB,                       \
           const __grid_constant__ CUtensorMap tC, const float* As, const float* Bs, float* C, const int* off,    \
           int E, int M, int N, int accumulate, int outMode, int sorted) {                                       \
    sm90_fp8_grouped<BN, STAGES, Mainloop::LOOP, Segments::AlongK, false, SM90_MAX_E, PINGPONG, STAGED, FILL,    \
                     STRIPS, LAG>(                                                                               \
        &tA, &tB, &tC, As, Bs, C, off, E, M, N, 0, accumulate, outMode, E * M, sorted != 0);                     \
  }
// 128 x 256 tiles: half the L2 traffic per FLOP of 128 x 128; one buffer, the two warpgroups'
// promotions overlapped with each other's wgmmas by taking turns (PINGPONG; measured the same as
// issuing together, notes/sm90-gemm.md).
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256_pingpong, 256, 3, OneBuffer, true, false, false, 0, false)
// The same with the scales in the ring (STAGED_SCALES), the epilogue stored strip by strip (STRIPS:
// gate_up Wgrad +3-5%) and warpgroup 1 a chunk behind warpgroup 0 instead of turns (LAG: +1-4%):
// the default, MOE8_SM90_WGRAD_STAGED=1 (notes/sm90-gemm.md).
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256_staged, 256, 3, OneBuffer, false, true, false, 64, true)
// The default with LEAN: the warp index, the tile's fields and the tile count warp-uniform to ptxas
// (read back from lane 0), the wgmma descriptors from their low words in uniform registers, so that
// no mask, shift and R2UR chain precedes each wgmma: the default (gate_up Wgrad +2-3%, down even;
// notes/sm90-gemm.md, twenty-eighth and twenty-ninth sessions).
KERNEL void __launch_bounds__(SM90_THREADS, 1)
    gemm_sm90_fp8_wgrad_128x256_lean(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tB,
                                     const __grid_constant__ CUtensorMap tC, const float* As, const float* Bs, float* C,
                                     const int* off, int E, int M, int N, int accumulate, int outMode, int sorted) {
  sm90_fp8_grouped<256, 3, Mainloop::OneBuffer, Segments::AlongK, false, SM90_MAX_E, false, true, false, 64, true, false,
                   true>(&tA, &tB, &tC, As, Bs, C, off, E, M, N, 0, accumulate, outMode, E * M, sorted != 0);
}
// Its racecheck twin: every order in named barriers, the scales stored by the loading warp
// (FILL_BARRIER; MOE8_SM90_WGRAD_STAGED=checked). It takes turns rather than lagging: its consumers
// wait at the fill and release barriers together, which would hold warpgroup 0 at warpgroup 1's
// chunk (and deadlock at the first, where warpgroup 1 waits for warpgroup 0); the lag adds no
// shared-memory access and changes no order in the ring, which the twin checks.
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256_staged_checked, 256, 3, OneBuffer, true, true, true, 64, false)
// The default before LAG, taking turns (MOE8_SM90_WGRAD_STAGED=turns).
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256_turns, 256, 3, OneBuffer, true, true, false, 64, false)
// Staged scales, turns, the epilogue by 128-column halves (the default before the strips;
// MOE8_SM90_WGRAD_STAGED=halves).
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256_halves, 256, 3, OneBuffer, true, true, false, 0, false)
// The first entry above (scales loaded by the consumers), both warpgroups issuing together
// (MOE8_SM90_WGRAD_STAGED=0 MOE8_SM90_PINGPONG=0; for measuring the two).
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x256, 256, 3, OneBuffer, false, false, false, 0, false)
// 128 x 128 tiles: two accumulator sets, the promotion overlapped with the next chunk's wgmmas.
GEMM_SM90_WGRAD_ENTRY(gemm_sm90_fp8_wgrad_128x128, 128, 4, TwoBuffers, false, false, false, 0, false)

#define SM90_TP_COLS 64  // columns per block of sm90_coltile_transpose

// Wgrad's operand layout: the column-tiled FP8 codes q [rows, cols] (quant_coltile's 128-row tiles
// restarted at each expert's first row off[e]) transposed to out [cols, pitch], expert e's rows
// padded with zero codes to whole 128-chunks and its chunks starting at sum over e' < e of
// ceil(n_e' / 128): the chunk numbering of quant_coltile's scales. One block per 64 columns x one
// chunk; grid.y covers the largest chunk count, ceil(rows / 128) + E (blocks past it return).
// Requires cols % 16 == 0 and pitch % 16 == 0 (16-byte loads and stores).
KERNEL void __launch_bounds__(256) sm90_coltile_transpose(const u8* q, u8* out, const int* off, int E, int rows,
                                                          int cols, i64 pitch) {
  __shared__ int cs[SM90_MAX_E + 1];  // first chunk of each expert, cs[E] = all chunks
  __shared__ __align__(16) u8 tile[128][SM90_TP_COLS + 16];
  const int tid = threadIdx.x, lane = tid & 31;
  if (E > SM90_MAX_E) asm volatile("trap;");
  if (tid < E) cs[tid + 1] = cdiv(off[tid + 1] - off[tid], 128);
  __syncthreads();
  if (tid < 32) {
    int carry = 0;
    for (int b = 0; b < E; b += 32) {
      int v = b + lane < E ? cs[b + lane + 1] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
      }
      if (b + lane < E) cs[b + lane + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) cs[0] = 0;
  }
  __syncthreads();
  const int g = blockIdx.y;
  if (g >= cs[E]) return;
  int lo = 0, hi = E - 1;  // the last expert whose first chunk is <= g (it holds g)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cs[mid] <= g) lo = mid;
    else hi = mid - 1;
  }
  const int r0 = off[lo] + (g - cs[lo]) * 128, h = min(128, off[lo + 1] - r0);
  const int c0 = blockIdx.x * SM90_TP_COLS;
  for (int i = tid; i < 128 * SM90_TP_COLS / 16; i += 256) {
    const int r = i / (SM90_TP_COLS / 16), c = (i % (SM90_TP_COLS / 16)) * 16;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < h && r0 + r < rows && c0 + c < cols) v = *(const uint4*)(q + (i64)(r0 + r) * cols + c0 + c);
    *(uint4*)&tile[r][c] = v;
  }
  __syncthreads();
  for (int i = tid; i < SM90_TP_COLS * 8; i += 256) {
    const int c = i >> 3, r = (i & 7) * 16;
    if (c0 + c >= cols) continue;
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
      w[k] = (u32)tile[r + 4 * k][c] | ((u32)tile[r + 4 * k + 1][c] << 8) | ((u32)tile[r + 4 * k + 2][c] << 16) |
             ((u32)tile[r + 4 * k + 3][c] << 24);
    *(uint4*)(out + (i64)(c0 + c) * pitch + (i64)g * 128 + r) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}
