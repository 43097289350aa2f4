// Pieces of gemm_sm90.cu's kernels, included by it after its #defines (SM90_BM, SM90_MAX_E, ...):
// one chunk's wgmmas, the promotions of a chunk's partial sums into the f32 accumulators, the
// dynamic shared memory an entry needs, the rows no segment covers, and the persistent CTAs' tile
// schedule and its tables. The mainloop template and the entry points stay in gemm_sm90.cu.

// d (+)= A * B^T for one m64n128k32 step: A, B from shared memory (descriptors), f32 accumulators.
__device__ __forceinline__ void wgmma_n128(float* d, u64 da, u64 db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}

// The 4 k32 wgmmas of one 128-deep chunk into a fresh accumulator p (step(ks) issues step ks),
// issued and committed as one group; the caller waits.
template <int ACC, class Step>
__device__ __forceinline__ void mma_steps(float (&p)[ACC], Step step) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ks++) step(ks);
  wgmma_commit();
}

// One chunk from its A and B tiles' shared addresses.
template <int ACC>
__device__ __forceinline__ void mma_chunk(float (&p)[ACC], u32 aAddr, u32 bAddr) {
  mma_steps(p, [&](int ks) { wgmma_n128(p, sm90_desc(aAddr + ks * 32), sm90_desc(bAddr + ks * 32), ks); });
}

// The same step from the descriptors' low words (shared address >> 4; a shared-memory address is
// below 2^18, so sm90_desc's mask is a no-op), joined to sm90_desc's constant high word.
__device__ __forceinline__ void wgmma_n128_lo(float* d, u32 aLo, u32 bLo, int accumulate) {
  wgmma_n128(d, sm90_desc(0) | aLo, sm90_desc(0) | bLo, accumulate);
}

// One chunk from the low words of its A and B tiles' descriptors (a k32 step is +2: 32 bytes).
template <int ACC>
__device__ __forceinline__ void mma_chunk_lo(float (&p)[ACC], u32 aLo, u32 bLo) {
  mma_steps(p, [&](int ks) { wgmma_n128_lo(p, aLo + 2 * ks, bLo + 2 * ks, ks); });
}

// Promotion: acc += p * (row scale * sb), accumulator i belonging to row g (i & 2 == 0) or g + 8.
template <int ACC>
__device__ __forceinline__ void promote(float (&acc)[ACC], float (&p)[ACC], float sa0, float sa1, float sb) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
  const float c0 = sa0 * sb, c1 = sa1 * sb;
#pragma unroll
  for (int i = 0; i < ACC; i++) acc[i] = fmaf(p[i], (i & 2) ? c1 : c0, acc[i]);
}

// Wgrad's promotion: both operands have one scale per row of the chunk, so
// acc += p * (sa[row] * sb[col]); sb points at this thread's first column (2 tq) of the half in
// shared memory, its columns 8 j + {0, 1}.
template <int ACC>
__device__ __forceinline__ void promote_cols(float (&acc)[ACC], float (&p)[ACC], float sa0, float sa1,
                                             const float* sb) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
#pragma unroll
  for (int j = 0; j < ACC / 4; j++) {
    const float2 b = *(const float2*)(sb + 8 * j);
    acc[4 * j] = fmaf(p[4 * j], sa0 * b.x, acc[4 * j]);
    acc[4 * j + 1] = fmaf(p[4 * j + 1], sa0 * b.y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(p[4 * j + 2], sa1 * b.x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(p[4 * j + 3], sa1 * b.y, acc[4 * j + 3]);
  }
}

// The same with this thread's column scales already in registers: b[j] holds columns 8 j + {0, 1}
// (promote_cols_part). A second body rather than the one above loading into an array first: that
// would move the full halves' loads ahead of the fences, a schedule not measured.
template <int ACC>
__device__ __forceinline__ void promote_cols(float (&acc)[ACC], float (&p)[ACC], float sa0, float sa1,
                                             const float2 (&b)[ACC / 4]) {
#pragma unroll
  for (int i = 0; i < ACC; i++) reg_fence(p[i]);
#pragma unroll
  for (int j = 0; j < ACC / 4; j++) {
    acc[4 * j] = fmaf(p[4 * j], sa0 * b[j].x, acc[4 * j]);
    acc[4 * j + 1] = fmaf(p[4 * j + 1], sa0 * b[j].y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(p[4 * j + 2], sa1 * b[j].x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(p[4 * j + 3], sa1 * b[j].y, acc[4 * j + 3]);
  }
}

// promote_cols for a half partly past N: only the column pairs 8 j + 2 tq + {0, 1} below the
// half's live columns are read (`live` counted from this thread's first column); the others, never
// stored, take scale 0.
template <int ACC>
__device__ __forceinline__ void promote_cols_part(float (&acc)[ACC], float (&p)[ACC], float sa0, float sa1,
                                                  const float* sb, int live) {
  float2 b[ACC / 4];
#pragma unroll
  for (int j = 0; j < ACC / 4; j++) b[j] = 8 * j < live ? *(const float2*)(sb + 8 * j) : make_float2(0.0f, 0.0f);
  promote_cols(acc, p, sa0, sa1, b);
}

// Where the experts' segments lie: along M (Fprop, Dgrad: rows of A and C) or along K (Wgrad).
enum class Segments { AlongM, AlongK };

// The mainloop's use of the tensor cores: OneBuffer waits for each chunk's wgmmas before promoting
// them (any BN); TwoBuffers issues chunk k+1's wgmmas before promoting chunk k (two accumulator sets:
// BN = 128 only, for registers).
enum class Mainloop { OneBuffer, TwoBuffers };

// Bytes of dynamic shared memory: 1024 of alignment pad (the swizzled tiles must start 1024-aligned,
// and where the dynamic shared memory starts is the driver's choice: a tool such as compute-sanitizer
// may move it), STAGES x (A tile BM x 128 bytes, B tile BN x 128 bytes), the C staging (per consumer
// warpgroup one 64 x 128 half-tile of f32, or of BF16 in the BF16-only entry), the full/empty
// barriers, the offsets and the prefix sums of m-tiles per expert (maxE + 1 each); for Wgrad
// (rowScales) also each consumer warpgroup's two chunk scale buffers (its 64 rows and the tile's bn
// columns), or with stagedScales each ring stage's scales (the tile's 128 rows, then its bn columns),
// and the experts' order (maxE).
__host__ __device__ constexpr int sm90_smem_bytes(int bn, int stages, bool rowScales, bool bf16Staging = false,
                                                  int maxE = SM90_MAX_E, bool stagedScales = false) {
  return 1024 + stages * (SM90_BM + bn) * 128 + 2 * 64 * 128 * (bf16Staging ? 2 : 4) +
         (rowScales ? (stagedScales ? stages * (SM90_BM + bn) * 4 : 2 * 2 * (64 + bn) * 4) : 0) + 2 * stages * 8 +
         2 * (maxE + 1) * 4 + (rowScales ? maxE * 4 : 0);
}

// Writes 0 to the rows of C [rows, N] outside [lo, hi), the rows no segment covers (none when the
// segments cover C, as in the model), spread over the grid. N % 8 == 0 and a 16-byte-aligned C:
// whole float4s. Not inlined, so that its registers stay out of the mainloop's allocation.
__device__ __noinline__ void sm90_zero_uncovered(float* C, int lo, int hi, int rows, int N) {
  const i64 n4 = N / 4, count = ((i64)lo + (rows - hi)) * n4;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / n4, row = r < lo ? r : hi + (r - lo);
    ((float4*)(C + row * N))[i - r * n4] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// Writes v to the entries of S [rows, n] in the rows outside [lo, hi): an FP8 output's scales for
// the rows no segment covers (their codes are sm90_zero_uncovered's zero bytes).
__device__ __noinline__ void sm90_fill_uncovered(float* S, int lo, int hi, int rows, int n, float v) {
  const i64 count = ((i64)lo + (rows - hi)) * n;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / n, row = r < lo ? r : hi + (r - lo);
    S[row * n + (i - r * n)] = v;
  }
}

// One output tile of the schedule: its expert, the rows of its A and B boxes, its K chunks
// (k0 .. k0 + kc - 1), the first row of C it writes and the end of its expert's rows in C.
struct Sm90Tile {
  int e, aRow, bRow, k0, kc, cRow, rowEnd, n0;
};

// The tile's fields read back from lane 0 (the whole warp calls it): values ptxas then knows
// warp-uniform, read from shared memory tables as they are (the gemm entries' LEAN).
__device__ __forceinline__ Sm90Tile sm90_tile_uniform(const Sm90Tile& T) {
  Sm90Tile U;
  U.e = __shfl_sync(0xffffffffu, T.e, 0);
  U.aRow = __shfl_sync(0xffffffffu, T.aRow, 0);
  U.bRow = __shfl_sync(0xffffffffu, T.bRow, 0);
  U.k0 = __shfl_sync(0xffffffffu, T.k0, 0);
  U.kc = __shfl_sync(0xffffffffu, T.kc, 0);
  U.cRow = __shfl_sync(0xffffffffu, T.cRow, 0);
  U.rowEnd = __shfl_sync(0xffffffffu, T.rowEnd, 0);
  U.n0 = __shfl_sync(0xffffffffu, T.n0, 0);
  return U;
}

// Tile t. Along M: m-tiles of each expert in order (mpre: prefix sums of m-tiles), n fastest, found by
// bisection. Along K: E x MT x NT tiles, expert-major; mpre holds each expert's first 128-chunk.
// A tile along K costs its expert's chunk count, which routing makes uneven, so with `sorted` the
// experts are taken largest first (order: expert ids by falling chunk count) and dealt in a snake:
// the CTAs' round r of gridDim.x tiles runs left to right when r is even, right to left when odd,
// so that no CTA takes the largest tile of every round (notes/sm90-gemm.md, sixteenth session:
// round robin over the experts in id order ends 13-20% past the mean CTA's work at small's loads).
template <Segments SEG, int BN>
__device__ __forceinline__ Sm90Tile sm90_tile(int t, const int* soff, const int* mpre, const int* order, bool sorted,
                                              int E, int M, int N, int KC) {
  const int NT = cdiv(N, BN);
  Sm90Tile T;
  if constexpr (SEG == Segments::AlongM) {
    const int mt = t / NT, nt = t - mt * NT;
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (mpre[mid] <= mt) lo = mid;
      else hi = mid - 1;
    }
    T.e = lo;
    T.aRow = soff[lo] + (mt - mpre[lo]) * SM90_BM;
    T.bRow = lo * N + nt * BN;
    T.k0 = 0;
    T.kc = KC;
    T.cRow = T.aRow;
    T.rowEnd = soff[lo + 1];
    T.n0 = nt * BN;
  } else {
    const int per = cdiv(M, SM90_BM) * NT;
    int u = t, e;
    if (sorted) {
      const int G = gridDim.x, r = t / G, i = t - r * G;
      if (r & 1) u = r * G + min(G, E * per - r * G) - 1 - i;
      e = order[u / per];
    } else {
      e = u / per;
    }
    const int rt = u - (u / per) * per, mt = rt / NT, nt = rt - mt * NT;
    T.e = e;
    T.aRow = mt * SM90_BM;
    T.bRow = nt * BN;
    T.k0 = mpre[e];
    T.kc = mpre[e + 1] - mpre[e];
    T.cRow = e * M + T.aRow;
    T.rowEnd = e * M + M;
    T.n0 = nt * BN;
  }
  return T;
}

// The tables every CTA builds in shared memory before its first tile (all threads call it; it
// synchronises the block): soff, the E + 1 offsets; mpre, the prefix sums of each expert's 128-row
// (along M) or 128-token (along K) pieces; with `rank`, order, the expert ids by falling piece
// count (an expert's place: the experts with more pieces, and those before it with as many).
// warp and lane come from the caller: computed here again from threadIdx, they reordered the
// 128 x 128 Fprop's instructions (FFMAs scheduled differently); passed in, every entry's SASS is
// what it was with these tables inline.
__device__ __forceinline__ void sm90_tables(const int* off, int E, int* soff, int* mpre, int* order, bool rank,
                                            int warp, int lane) {
  if (warp == 0) {
    int carry = 0;
    for (int b = 0; b < E; b += 32) {
      const int e = b + lane;
      int v = 0;
      if (e < E) {
        const int lo = off[e], hi = off[e + 1];
        soff[e] = lo;
        if (e == E - 1) soff[E] = hi;
        v = cdiv(hi - lo, 128);
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
  if (rank) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const int ke = mpre[e + 1] - mpre[e];
      int r = 0;
      for (int f = 0; f < E; f++) {
        const int kf = mpre[f + 1] - mpre[f];
        r += kf > ke || (kf == ke && f < e);
      }
      order[r] = e;
    }
    __syncthreads();
  }
}
