// Fused FP8 quantisation (amax + scale + encode) for every group layout, bit-exact with the
// reference (fp8-core quantize): amax = max(max|x|, eps); inv = f32(FMAX / amax) with IEEE
// division; q = encode(f32(x * inv)); scale = f32(amax / FMAX). Scales are written in the
// Tensor's logical layout (docs/numerics.md): tile [rows][ceil(cols/128)], block per matrix
// [ceil(rows/128)][ceil(cols/128)], column-tile per matrix or segment [ceil(rows/128)][cols],
// row [rows], tensor one per matrix. fmt: FMT_E4M3 or FMT_E5M2; mode: SCALE_AMAX, SCALE_POW2 or SCALE_UNIT
// (common.cuh).

// Row groups: each row of the R x C matrix split into groups of `gw` columns (the row layout uses
// gw = C; 1x128 tiles take quant_tile128, one warp per tile).
// Block (g, r) handles group g of row r; scales[r * ngroups + g].
KERNEL void quant_rowgroups(const float* x, u8* q, float* scales, int R, int C, int gw, int fmt, int mode, float eps) {
  const int g = blockIdx.x;
  const int r = blockIdx.y + blockIdx.z * GRID_YZ_MAX;
  if (r >= R) return;
  const int ngroups = cdiv(C, gw);
  const int c0 = g * gw;
  const int c1 = min(c0 + gw, C);
  const float* xr = x + (i64)r * C;
  float a = 0.0f;
  for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) a = amax_add(a, xr[c]);
  a = block_max(a);
  const QScale s = qscale(a, eps, fmt, mode);
  for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) q[(i64)r * C + c] = quant_value(xr[c], s, fmt, mode);
  if (threadIdx.x == 0) scales[(i64)r * ngroups + g] = s.scale;
}

// 1x128 tiles, eight lanes per tile (lane j of a group takes columns 4j + 32i, i < 4: each of its
// four 16-byte loads is part of one 128-byte line the group reads together). A warp quantises four
// tiles at once, so the per-tile work (the amax's shuffles, the scale's two IEEE divisions, the
// tile's row and column) is issued once per four tiles. (One warp per tile was bound by instruction
// issue: Nsight Compute on the experts' 98,304 x 1,024 gradient gave SM 83%, DRAM 43%.) Same amax,
// scale and codes as quant_rowgroups.
#define TILE_LANES 8
KERNEL void quant_tile128(const float* x, u8* q, float* scales, int R, int C, int fmt, int mode, float eps) {
  // Tile counts fit in 32 bits (R * ceil(C / 128) < 2^31 for any tensor the allocator can hold at
  // 4 bytes per value), and 32-bit division is a few instructions where 64-bit is a long sequence.
  const int ng = cdiv(C, 128), j = threadIdx.x % TILE_LANES;
  const int w = blockIdx.x * (blockDim.x / TILE_LANES) + threadIdx.x / TILE_LANES;
  // No early return: every lane of the warp takes part in the shuffles.
  const bool live = w < R * ng;
  const int r = live ? w / ng : 0, g = live ? w - r * ng : 0;
  const int width = min(128, C - g * 128);
  const bool vec = (C & 3) == 0;
  const float* xr = x + (i64)r * C + g * 128;
  float v[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = 4 * j + 32 * i;
    if (live && vec && c + 4 <= width) {
      const float4 t = *(const float4*)(xr + c);
      v[i][0] = t.x, v[i][1] = t.y, v[i][2] = t.z, v[i][3] = t.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; e++) v[i][e] = live && c + e < width ? xr[c + e] : 0.0f;
    }
  }
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int e = 0; e < 4; e++) a = amax_add(a, v[i][e]);
#pragma unroll
  for (int o = 1; o < TILE_LANES; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  if (!live) return;
  const QScale s = qscale(a, eps, fmt, mode);
  u8* qr = q + (i64)r * C + g * 128;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = 4 * j + 32 * i;
    u8 b[4];
#pragma unroll
    for (int e = 0; e < 4; e++) b[e] = quant_value(v[i][e], s, fmt, mode);
    if (vec && c + 4 <= width) {
      *(u32*)(qr + c) = (u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24);
    } else {
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (c + e < width) qr[c + e] = b[e];
    }
  }
  if (j == 0) scales[w] = s.scale;
}

// Four codes in one word (v.x in the low byte). Out of line: inlined into each of quant_block's 16
// unrolled loads, the three scale modes and two formats made a kernel NVRTC took 78 s to compile.
__device__ __noinline__ u32 quant4(float4 v, QScale s, int fmt, int mode) {
  return (u32)quant_value(v.x, s, fmt, mode) | ((u32)quant_value(v.y, s, fmt, mode) << 8) |
         ((u32)quant_value(v.z, s, fmt, mode) << 16) | ((u32)quant_value(v.w, s, fmt, mode) << 24);
}


// The 4 x 4 bytes of four words (w[i]: row i, byte e = column e) transposed: o[e] holds column e's
// four bytes, row 0 in the low byte.
__device__ __forceinline__ void transpose4x4_bytes(u32 w0, u32 w1, u32 w2, u32 w3, u32 (&o)[4]) {
  const u32 lo01 = __byte_perm(w0, w1, 0x5140), hi01 = __byte_perm(w0, w1, 0x7362);
  const u32 lo23 = __byte_perm(w2, w3, 0x5140), hi23 = __byte_perm(w2, w3, 0x7362);
  o[0] = __byte_perm(lo01, lo23, 0x5410), o[1] = __byte_perm(lo01, lo23, 0x7632);
  o[2] = __byte_perm(hi01, hi23, 0x5410), o[3] = __byte_perm(hi01, hi23, 0x7632);
}

// 128x128 blocks of `batch` matrices of rows x cols. Block (cb, rb, b) of 256 threads holds the
// whole block in registers, warp w rows 16 w .. 16 w + 15 and lane l columns 4 l .. 4 l + 3 of each
// (16 four-wide loads per thread, all issued before the amax), so the values are read once.
// With qt given (rows % 16 == 0 and cols % 16 == 0), also the transposed codes qt [batch][cols][rows]
// and scales st [batch][ncb][nrb]: the Dgrad's weight operand (W^T with both operands K-contiguous),
// exact since a 128x128 block's scale does not depend on the orientation. A lane's 16 rows of one
// column are one 16-byte piece of a row of W^T, made from its row codes by 4 x 4 byte transposes in
// registers. (Staging the codes in shared memory and reading them back a byte at a time took 1.69 ms
// of the small step, with quant4 out of line for every code.)
KERNEL void __launch_bounds__(256) quant_block(const float* x, u8* q, float* scales, int rows, int cols, int fmt,
                                               int mode, float eps, u8* qt, float* st) {
  const int cb = blockIdx.x, rb = blockIdx.y, b = blockIdx.z;
  const int ncb = cdiv(cols, 128), nrb = cdiv(rows, 128);
  const int r0 = rb * 128 + 16 * (threadIdx.x >> 5), c0 = cb * 128;
  const int h = min(128, rows - rb * 128) - 16 * (threadIdx.x >> 5), w = min(128, cols - c0);
  const int c = 4 * (threadIdx.x & 31);
  const i64 base = (i64)b * rows * cols;
  const bool vec = (cols & 3) == 0;
  float4 v[16];
  float a = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; j++) {
    const float* p = x + base + (i64)(r0 + j) * cols + c0 + c;
    v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (j < h) {
      if (vec && c < w) {
        v[j] = *(const float4*)p;
      } else {
        if (c < w) v[j].x = p[0];
        if (c + 1 < w) v[j].y = p[1];
        if (c + 2 < w) v[j].z = p[2];
        if (c + 3 < w) v[j].w = p[3];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 16; j++)
    a = amax_add4(a, v[j]);
  a = block_max(a);
  const QScale s = qscale(a, eps, fmt, mode);
  u32 codes[16];
  if (mode == SCALE_POW2) {
#pragma unroll
    for (int j = 0; j < 16; j++) codes[j] = quant4(v[j], s, fmt, mode);
  } else {
#pragma unroll
    for (int j = 0; j < 16; j++)
      codes[j] = quant_mul4(v[j].x, v[j].y, v[j].z, v[j].w, s.factor, s.factor, s.factor, s.factor, fmt);
  }
#pragma unroll
  for (int j = 0; j < 16; j++) {
    if (j >= h || c >= w) continue;
    u8* qp = q + base + (i64)(r0 + j) * cols + c0 + c;
    if (vec) {
      *(u32*)qp = codes[j];
    } else {
      qp[0] = codes[j] & 0xff;
      if (c + 1 < w) qp[1] = (codes[j] >> 8) & 0xff;
      if (c + 2 < w) qp[2] = (codes[j] >> 16) & 0xff;
      if (c + 3 < w) qp[3] = codes[j] >> 24;
    }
  }
  if (threadIdx.x == 0) scales[(i64)b * nrb * ncb + rb * ncb + cb] = s.scale;
  if (!qt) return;
  if (threadIdx.x == 0) st[(i64)b * nrb * ncb + cb * nrb + rb] = s.scale;
  if (h <= 0 || c >= w) return;  // h % 16 == 0: a warp's 16 rows are all in the matrix or none
  u32 t[4][4];  // t[k][e]: column c + e, rows 4 k .. 4 k + 3 of the warp's 16
#pragma unroll
  for (int k = 0; k < 4; k++)
    transpose4x4_bytes(codes[4 * k], codes[4 * k + 1], codes[4 * k + 2], codes[4 * k + 3], t[k]);
#pragma unroll
  for (int e = 0; e < 4; e++)
    if (c + e < w)
      *(uint4*)(qt + base + (i64)(c0 + c + e) * rows + r0) = make_uint4(t[0][e], t[1][e], t[2][e], t[3][e]);
}

// Where column tiles read their values: an f32 matrix, or the FP8 codes and scales of a 2-D
// quantised matrix (requantisation: the value is decode(code) * scale, as dequant_rows computes it,
// so the result is bit-identical to quantising the dequantised matrix, without writing it).
// at4 reads columns c..c+3 of row r with one load (cols % 4 == 0; the caller checks).
struct F32Values {
  const float* x;
  __device__ __forceinline__ float at(int r, int c, int cols) const { return x[(i64)r * cols + c]; }
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const { return *(const float4*)(x + (i64)r * cols + c); }
};
struct Fp8Values {
  const u8* q;
  const float* scales;
  int group, rows, fmt;
  __device__ __forceinline__ float value(u8 code, int r, int c, int cols) const {
    return __fmul_rn(decode_fp8(code, fmt), scales[scale_index(group, r, c, rows, cols)]);
  }
  __device__ __forceinline__ float at(int r, int c, int cols) const { return value(q[(i64)r * cols + c], r, c, cols); }
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const {
    const u32 w = *(const u32*)(q + (i64)r * cols + c);
    return make_float4(value(w & 0xff, r, c, cols), value((w >> 8) & 0xff, r, c + 1, cols),
                       value((w >> 16) & 0xff, r, c + 2, cols), value(w >> 24, r, c + 3, cols));
  }
};

// The codes and scales of a 2-D matrix of 1x128 tiles (the activation caches every Wgrad operand is
// requantised from): four adjacent codes (c % 4 == 0) share one scale, looked up once, and two codes
// decode with one instruction. Values as Fp8Values computes them.
struct Fp8TileValues {
  const u8* q;
  const float* scales;
  int fmt;
  __device__ __forceinline__ float at(int r, int c, int cols) const {
    return __fmul_rn(decode_fp8(q[(i64)r * cols + c], fmt), scales[(i64)r * cdiv(cols, 128) + c / 128]);
  }
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const {
    const u32 w = *(const u32*)(q + (i64)r * cols + c);
    const float s = scales[(i64)r * cdiv(cols, 128) + c / 128];
    float v[4];
    decode_fp8x4(w, fmt, v);
    return make_float4(__fmul_rn(v[0], s), __fmul_rn(v[1], s), __fmul_rn(v[2], s), __fmul_rn(v[3], s));
  }
};

// 128x1 column tiles, restarted at each piece (matrix, or expert segment when seg is given).
// A block of 256 threads quantises one 128-row group of 64 columns: the block's loads are all
// issued before any is used (8 four-wide loads per thread, staged in shared memory), each column's
// amax is reduced by four threads, then each thread encodes four adjacent codes per row and
// stores them as one word. (A thread per column walking down 128 rows kept too few loads in
// flight: the kernel was latency-bound at a fraction of the memory bandwidth.)
// Grid (ceil(cols/64), groups, pieces) without segments; with segments grid.y enumerates the row
// groups of all segments in order (at most ceil(rows/128) + #segments of them) and grid.z is 1.
#define CT_COLS 64
// The 128-row group of this block of a column-tile grid (see coltile): its first row a0 and height
// h, the offset soff of its piece's scales, and rb, its index within the piece; false when the block
// has no group (grid.y enumerates an upper bound of the groups).
struct ColGroup {
  int a0, h, rb;
  i64 soff;
};
// With segments each warp finds the block's piece in one pass: lane l takes segments l, l + 32, ...,
// a warp scan of their group counts gives each segment's first group, and a ballot the segment that
// holds blockIdx.y (the first whose groups end past it); its scales start after all earlier groups'.
// (Walking the segments one at a time, twice, cost a block hundreds of dependent loads before its
// first data load: most of the experts' Wgrad quantisation time at 64 experts.)
__device__ __forceinline__ bool col_group(const int* seg, int nseg, int rows, int cols, ColGroup* g) {
  int rb = blockIdx.y, r0, n;
  i64 before;  // groups of the earlier pieces
  if (seg) {
    const int lane = threadIdx.x & 31;
    int p = -1, done = 0;
    for (int base = 0; base < nseg && p < 0; base += 32) {
      const int e = base + lane;
      const int groups = e < nseg ? cdiv(seg[e + 1] - seg[e], 128) : 0;
      int incl = groups;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, e < nseg && rb < done + incl);
      if (hit) {
        const int l = __ffs(hit) - 1;
        p = base + l;
        before = done + __shfl_sync(0xffffffffu, incl - groups, l);
      } else {
        done += __shfl_sync(0xffffffffu, incl, 31);
      }
    }
    if (p < 0) return false;
    rb -= (int)before;
    r0 = seg[p];
    n = seg[p + 1] - seg[p];
  } else {
    const int p = blockIdx.z;
    r0 = p * rows;
    n = rows;
    before = (i64)p * cdiv(rows, 128);
  }
  if (rb * 128 >= n) return false;
  g->a0 = r0 + rb * 128, g->h = min(128, n - rb * 128), g->rb = rb, g->soff = before * cols;
  return true;
}

//
// kpitch > 0: q is stored K-major instead, as the Hopper Wgrad reads it (gemm_sm90.cu): [cols, kpitch],
// the 128 codes of chunk g of column c at q[c * kpitch + g * 128], chunks numbered across the pieces
// in order (the numbering of the scales), rows past a piece's end written as zero codes. Only for
// one matrix (2-D); kpitch % 16 == 0.
// The staged tile, the column maxima's four partial rows and the columns' scales (declared once per
// kernel: a kernel with two instantiations of coltile would otherwise hold two copies).
struct ColTileSmem {
  float v[128][CT_COLS + 1];
  float part[4][CT_COLS];
  QScale sc[CT_COLS];
};
template <class Values>
__device__ __forceinline__ void coltile(Values x, u8* q, float* scales, const int* seg, int nseg, int rows, int cols,
                                        int fmt, int mode, float eps, i64 kpitch, ColTileSmem& sm) {
  float(&v)[128][CT_COLS + 1] = sm.v;
  float(&part)[4][CT_COLS] = sm.part;
  QScale(&sc)[CT_COLS] = sm.sc;
  ColGroup grp;
  if (!col_group(seg, nseg, rows, cols, &grp)) return;
  const int a0 = grp.a0, h = grp.h, rb = grp.rb;
  const i64 soff = grp.soff;
  const int c0 = blockIdx.x * CT_COLS, tid = threadIdx.x;
  const bool vec = (cols & 3) == 0;
  // Stage the 128 x 64 tile (zeros outside the matrix: they never raise an amax).
  float4 t[8];
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = tid + j * 256, r = i >> 4, c = c0 + (i & 15) * 4;
    t[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r < h) {
      if (vec && c < cols) {
        t[j] = x.at4(a0 + r, c, cols);
      } else {
        if (c < cols) t[j].x = x.at(a0 + r, c, cols);
        if (c + 1 < cols) t[j].y = x.at(a0 + r, c + 1, cols);
        if (c + 2 < cols) t[j].z = x.at(a0 + r, c + 2, cols);
        if (c + 3 < cols) t[j].w = x.at(a0 + r, c + 3, cols);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = tid + j * 256, r = i >> 4, c = (i & 15) * 4;
    v[r][c] = t[j].x, v[r][c + 1] = t[j].y, v[r][c + 2] = t[j].z, v[r][c + 3] = t[j].w;
  }
  __syncthreads();
  {
    const int c = tid & (CT_COLS - 1), quarter = tid >> 6;
    float a = 0.0f;
#pragma unroll 8
    for (int r = quarter * 32; r < quarter * 32 + 32; r++) a = amax_add(a, v[r][c]);
    part[quarter][c] = a;
  }
  __syncthreads();
  if (tid < CT_COLS) {
    const float a = fmaxf(fmaxf(part[0][tid], part[1][tid]), fmaxf(part[2][tid], part[3][tid]));
    sc[tid] = qscale(a, eps, fmt, mode);
    if (c0 + tid < cols) scales[soff + (i64)rb * cols + c0 + tid] = sc[tid].scale;
  }
  __syncthreads();
  if (kpitch > 0) {
    // 64 columns x 8 pieces of 16 codes: lanes 8k..8k+7 write one column's 128 contiguous bytes.
    // (A lane per column, 32 rows each, has no shared-memory bank conflicts but was slower on the
    // H200: 0.191 against 0.173 ms for the experts' 98,304 x 1,024 gradient.)
    const i64 chunk = soff / cols + rb;
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int i = tid + j * 256, c = i >> 3, r = (i & 7) * 16;
      if (c0 + c >= cols) continue;
      // Rows past h were staged as zeros, whose codes are the zero codes written there.
      float x[16];
#pragma unroll
      for (int e = 0; e < 16; e++) x[e] = v[r + e][c];
      const QScale s = sc[c];
      u32 w[4] = {0, 0, 0, 0};
      if (mode == SCALE_POW2) {
#pragma unroll
        for (int e = 0; e < 16; e++) w[e >> 2] |= (u32)quant_value(x[e], s, fmt, mode) << ((e & 3) * 8);
      } else {
#pragma unroll
        for (int k = 0; k < 4; k++)
          w[k] = quant_mul4(x[4 * k], x[4 * k + 1], x[4 * k + 2], x[4 * k + 3], s.factor, s.factor, s.factor,
                            s.factor, fmt);
      }
      *(uint4*)(q + (i64)(c0 + c) * kpitch + chunk * 128 + r) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = tid + j * 256, r = i >> 4, c = (i & 15) * 4;
    if (r >= h || c0 + c >= cols) continue;
    u8* qr = q + (i64)(a0 + r) * cols + c0 + c;
    if (vec && mode != SCALE_POW2) {
      *(u32*)qr = quant_mul4(v[r][c], v[r][c + 1], v[r][c + 2], v[r][c + 3], sc[c].factor, sc[c + 1].factor,
                             sc[c + 2].factor, sc[c + 3].factor, fmt);
      continue;
    }
    u8 b[4];
#pragma unroll
    for (int e = 0; e < 4; e++) b[e] = quant_value(v[r][c + e], sc[c + e], fmt, mode);
    if (vec) {
      *(u32*)qr = (u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24);
    } else {
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (c0 + c + e < cols) qr[e] = b[e];
    }
  }
}

KERNEL void __launch_bounds__(256) quant_coltile(const float* x, u8* q, float* scales, const int* seg, int nseg,
                                                 int rows, int cols, int fmt, int mode, float eps, i64 kpitch) {
  __shared__ ColTileSmem sm;
  coltile(F32Values{x}, q, scales, seg, nseg, rows, cols, fmt, mode, eps, kpitch, sm);
}

// Column tiles of a 2-D FP8 matrix (codes xq, scales xs in group xgroup, format xfmt): the
// backward's Wgrad operand made from the forward's 1x128 FP8 cache in one pass.
KERNEL void __launch_bounds__(256) requant_coltile(const u8* xq, const float* xs, int xgroup, int xfmt, u8* q,
                                                   float* scales, const int* seg, int nseg, int rows, int cols,
                                                   int fmt, int mode, float eps, i64 kpitch) {
  __shared__ ColTileSmem sm;
  if (xgroup == G_TILE)
    coltile(Fp8TileValues{xq, xs, xfmt}, q, scales, seg, nseg, rows, cols, fmt, mode, eps, kpitch, sm);
  else
    coltile(Fp8Values{xq, xs, xgroup, rows, xfmt}, q, scales, seg, nseg, rows, cols, fmt, mode, eps, kpitch, sm);
}

// requant_coltile for the case the model runs: a 1x128-tile FP8 cache requantised into K-major
// column tiles (kpitch > 0), cols % 128 == 0. A block takes 128 rows x 128 columns: the codes are
// staged as bytes, transposed (tT[column][row], 16 KB instead of 32 KB of f32 for half the
// columns; 4 x 4 bytes at a time in registers), with the rows' scales; two threads per column find
// its amax over 64 rows each; then each thread requantises 16 rows of one column and stores them as
// one 16-byte K-major chunk. Values,
// amax and codes as coltile computes them. (requant_coltile staged f32 values of 64 columns and
// moved 4 bytes of codes per load: a fifth of the memory bandwidth at the experts' shapes.)
#define RQ_PITCH 144
KERNEL void __launch_bounds__(256) requant_tile_kmajor(const u8* xq, const float* xs, int xfmt, u8* q, float* scales,
                                                       const int* seg, int nseg, int rows, int cols, int fmt,
                                                       int mode, float eps, i64 kpitch) {
  __shared__ __align__(16) u8 tT[128][RQ_PITCH];
  __shared__ __align__(16) float rs[128];
  __shared__ float part[2][128];
  __shared__ QScale sc[128];
  ColGroup grp;
  if (!col_group(seg, nseg, rows, cols, &grp)) return;
  const int a0 = grp.a0, h = grp.h, tid = threadIdx.x;
  const int c0 = blockIdx.x * 128, ng = cols / 128;
  // Stage: lane l of warp w loads rows 4 l .. 4 l + 3, columns 16 w .. 16 w + 15 (four 16-byte words),
  // transposes each 4 x 4 byte block in registers and stores it as four 4-byte words, one per column
  // (consecutive lanes, consecutive words: no bank conflict). Storing the 64 bytes one at a time
  // made the kernel bound by shared-memory stores (Nsight Compute: L1 97%, DRAM 25%).
  {
    const int l = tid & 31, cg = tid >> 5;
    u32 v[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int r = 4 * l + i;
      const uint4 w = r < h ? *(const uint4*)(xq + (i64)(a0 + r) * cols + c0 + 16 * cg) : make_uint4(0, 0, 0, 0);
      v[i][0] = w.x, v[i][1] = w.y, v[i][2] = w.z, v[i][3] = w.w;
    }
#pragma unroll
    for (int g = 0; g < 4; g++) {
      // Rows i = 0..3 of columns 4 g .. 4 g + 3: bytes (v[i][g] >> 8 j) & 0xff. Interleave rows 0|1
      // and 2|3 byte by byte, then take each column's four bytes.
      const u32 lo01 = __byte_perm(v[0][g], v[1][g], 0x5140), hi01 = __byte_perm(v[0][g], v[1][g], 0x7362);
      const u32 lo23 = __byte_perm(v[2][g], v[3][g], 0x5140), hi23 = __byte_perm(v[2][g], v[3][g], 0x7362);
      const int k = 16 * cg + 4 * g;
      *(u32*)&tT[k][4 * l] = __byte_perm(lo01, lo23, 0x5410);
      *(u32*)&tT[k + 1][4 * l] = __byte_perm(lo01, lo23, 0x7632);
      *(u32*)&tT[k + 2][4 * l] = __byte_perm(hi01, hi23, 0x5410);
      *(u32*)&tT[k + 3][4 * l] = __byte_perm(hi01, hi23, 0x7632);
    }
    if (tid < 128) rs[tid] = tid < h ? xs[(i64)(a0 + tid) * ng + blockIdx.x] : 0.0f;
  }
  __syncthreads();
  // Column maxima: thread (column tid % 128, rows 64 (tid / 128) ..) reads 16 codes at a time.
  {
    const int c = tid & 127, half = tid >> 7;
    float a = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int r0 = half * 64 + 16 * j;
      const uint4 w = *(const uint4*)&tT[c][r0];
      const u32 v[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int g = 0; g < 4; g++) {
        float d[4];
        decode_fp8x4(v[g], xfmt, d);
        const float4 s4 = *(const float4*)&rs[r0 + 4 * g];  // the same for every lane: a broadcast
        const float sv[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
        // |d s| = |d| s (the row scales are >= 0, 0 past the group's rows), and the FMUL takes |d|
        // as a free operand modifier; fmaxf ignores a NaN code's product as amax_add does.
        for (int e = 0; e < 4; e++) a = fmaxf(a, __fmul_rn(fabsf(d[e]), sv[e]));
      }
    }
    part[half][c] = a;
  }
  __syncthreads();
  if (tid < 128) {
    sc[tid] = qscale(fmaxf(part[0][tid], part[1][tid]), eps, fmt, mode);
    scales[grp.soff + (i64)grp.rb * cols + c0 + tid] = sc[tid].scale;
  }
  __syncthreads();
  // Codes: lanes 8k..8k+7 write one column's 128 contiguous bytes, 16 rows each; a thread's 16 rows
  // are the same for its four columns, so their scales are read once (per code, the shared-memory
  // reads of the scales kept the kernel L1-bound).
  const i64 chunk = grp.soff / cols + grp.rb;
  const int r0 = (tid & 7) * 16;
  float rv[16];
#pragma unroll
  for (int g = 0; g < 4; g++) {
    const float4 s4 = *(const float4*)&rs[r0 + 4 * g];
    rv[4 * g] = s4.x, rv[4 * g + 1] = s4.y, rv[4 * g + 2] = s4.z, rv[4 * g + 3] = s4.w;
  }
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int i = tid + j * 256, c = i >> 3;
    const uint4 w = *(const uint4*)&tT[c][r0];
    const u32 v[4] = {w.x, w.y, w.z, w.w};
    const QScale s = sc[c];
    u32 out[4];
#pragma unroll
    for (int g = 0; g < 4; g++) {
      float d[4];
      decode_fp8x4(v[g], xfmt, d);
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; e++) x[e] = __fmul_rn(d[e], rv[4 * g + e]);
      if (mode == SCALE_POW2) {
        u32 word = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) word |= (u32)quant_value(x[e], s, fmt, mode) << (8 * e);
        out[g] = word;
      } else {
        out[g] = quant_mul4(x[0], x[1], x[2], x[3], s.factor, s.factor, s.factor, s.factor, fmt);
      }
    }
    *(uint4*)(q + (i64)(c0 + c) * kpitch + chunk * 128 + r0) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// The row-major codes q [rows, cols] of a K-major column-tile matrix kq [cols, kpitch] (coltile's
// kpitch layout): the form every consumer but the Hopper Wgrad reads. Same grid as quant_coltile
// (one block per 64 columns of one 128-row group); rows outside every segment are left alone (the
// caller clears q). kpitch % 16 == 0.
KERNEL void __launch_bounds__(256) coltile_kmajor_rows(const u8* kq, u8* q, const int* seg, int nseg, int rows,
                                                       int cols, i64 kpitch) {
  __shared__ __align__(16) u8 t[CT_COLS][128 + 16];
  ColGroup grp;
  if (!col_group(seg, nseg, rows, cols, &grp)) return;
  const int a0 = grp.a0, h = grp.h, rb = grp.rb;
  const i64 soff = grp.soff;
  const int c0 = blockIdx.x * CT_COLS, tid = threadIdx.x;
  const i64 chunk = soff / cols + rb;
  for (int i = tid; i < CT_COLS * 8; i += 256) {
    const int c = i >> 3, r = (i & 7) * 16;
    if (c0 + c < cols) *(uint4*)&t[c][r] = *(const uint4*)(kq + (i64)(c0 + c) * kpitch + chunk * 128 + r);
  }
  __syncthreads();
  for (int i = tid; i < 128 * CT_COLS; i += 256) {
    const int r = i / CT_COLS, c = i % CT_COLS;
    if (r < h && c0 + c < cols) q[(i64)(a0 + r) * cols + c0 + c] = t[c][r];
  }
}

// Tensor-wise, stage 1: amax of each of `batch` matrices of n elements, as f32 bits (max of
// non-negative floats is the max of their bits: deterministic with atomics). amax must be zeroed.
KERNEL void quant_tensor_amax(const float* x, u32* amax, i64 n) {
  const int b = blockIdx.y;
  float a = 0.0f;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    a = amax_add(a, x[(i64)b * n + i]);
  a = block_max(a);
  if (threadIdx.x == 0) atomicMax(amax + b, __float_as_uint(a));
}

// Tensor-wise, stage 2: encode with the matrix's scale.
KERNEL void quant_tensor_encode(const float* x, u8* q, const u32* amax, float* scales, i64 n, int fmt, int mode, float eps) {
  const int b = blockIdx.y;
  const QScale s = qscale(__uint_as_float(amax[b]), eps, fmt, mode);
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    q[(i64)b * n + i] = quant_value(x[(i64)b * n + i], s, fmt, mode);
  if (blockIdx.x == 0 && threadIdx.x == 0) scales[b] = s.scale;
}

// decode(q) * scale, one block per row of `batch` matrices of rows x cols, or of a 2-D tensor
// with segments (a row's segment found once, by bisection). Rows outside every segment give 0.
KERNEL void dequant_rows(const u8* q, const float* scales, float* out, const int* seg, int nseg, int batch, int rows, int cols, int group, int fmt) {
  const i64 total = (i64)batch * rows;
  for (i64 R = blockIdx.x; R < total; R += gridDim.x) {
    const u8* qr = q + R * cols;
    float* orow = out + R * cols;
    i64 sbase = 0;
    int r = (int)(R % rows), n = rows;
    if (seg) {
      int lo = 0, hi = nseg;  // last e with seg[e] <= R, then R < seg[e + 1]
      if (R < seg[0] || R >= seg[nseg]) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) orow[c] = 0.0f;
        continue;
      }
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (seg[mid] <= R) lo = mid; else hi = mid;
      }
      for (int k = 0; k < lo; k++) sbase += scale_count(group, seg[k + 1] - seg[k], cols);
      r = (int)(R - seg[lo]);
      n = seg[lo + 1] - seg[lo];
    } else {
      sbase = (R / rows) * (i64)scale_count(group, rows, cols);
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
      orow[c] = __fmul_rn(decode_fp8(qr[c], fmt), scales[sbase + scale_index(group, r, c, n, cols)]);
  }
}

// FP8 range events (Backend.fp8Flow): counts[0] += overflows (x not finite, or a saturated code whose
// x lay beyond half an ulp above FMAX * scale), counts[1] += non-zero x encoded to zero. The counts are
// integers added as floats (exact below 2^24), so the result does not depend on the order of adds.
KERNEL void fp8_flow(const float* x, const u8* q, const float* deq, float* counts, int fmt, i64 n) {
  const u8 top = fmt == 0 ? 0x7e : 0x7b;
  const double tol = fmt == 0 ? 1.0 + 1.0 / 28.0 : 1.0 + 1.0 / 14.0;  // half an ulp above max
  float over = 0.0f, under = 0.0f;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float v = x[i];
    const u8 c = q[i] & 0x7f;
    const bool finite = (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
    if (!finite || (c == top && fabsf(v) > (double)fabsf(deq[i]) * tol)) over += 1.0f;
    else if (v != 0.0f && c == 0) under += 1.0f;
  }
  if (over != 0.0f) atomicAdd(&counts[0], over);
  if (under != 0.0f) atomicAdd(&counts[1], under);
}

// Transposes FP8 codes of `batch` matrices [rows][cols] -> [cols][rows] in 64 x 64 tiles with
// 16-byte loads and stores (rows, cols % 64 == 0; 16-byte aligned). With s given, block (0, 0, b) also
// transposes matrix b's 128x128 block scales [rb][cb] -> [cb][rb] into sout (the Dgrad's weight:
// codes and scales in one launch). Grid (cols / 64, rows / 64, batch), 256 threads. (The 32 x 32
// byte-wise kernel below moved 1 byte per access: a fifth of the memory bandwidth.)
KERNEL void __launch_bounds__(256) transpose_u8_64(const u8* x, u8* out, const float* s, float* sout, int rows,
                                                   int cols) {
  __shared__ __align__(16) u8 t[64][80];
  const int b = blockIdx.z, tid = threadIdx.x;
  const i64 off = (i64)b * rows * cols;
  const int c0 = blockIdx.x * 64, r0 = blockIdx.y * 64;
  {
    const int r = tid >> 2, k = (tid & 3) * 16;
    *(uint4*)&t[r][k] = *(const uint4*)(x + off + (i64)(r0 + r) * cols + c0 + k);
  }
  __syncthreads();
  {
    // A warp takes 32 adjacent columns of one 16-row chunk: its shared-memory reads hit 8 words.
    const int c = tid & 63, k = (tid >> 6) * 16;
    u32 w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int e = 0; e < 16; e++) w[e >> 2] |= (u32)t[k + e][c] << ((e & 3) * 8);
    *(uint4*)(out + off + (i64)(c0 + c) * rows + r0 + k) = make_uint4(w[0], w[1], w[2], w[3]);
  }
  if (s && blockIdx.x == 0 && blockIdx.y == 0) {
    const int rb = cdiv(rows, 128), cb = cdiv(cols, 128);
    const i64 so = (i64)b * rb * cb;
    for (int i = tid; i < rb * cb; i += 256) {
      const int r = i / cb, c = i - r * cb;
      sout[so + (i64)c * rb + r] = s[so + i];
    }
  }
}

// Transposes FP8 codes of `batch` matrices [rows][cols] -> [cols][rows] through 32 x 32 shared
// tiles (coalesced reads and writes). 256 threads; grid (ceil(cols/32), ceil(rows/32), batch).
KERNEL void transpose_u8_tiled(const u8* x, u8* out, int rows, int cols) {
  __shared__ u8 tile[32][33];
  const i64 off = (i64)blockIdx.z * rows * cols;
  const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32, tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  for (int i = ty; i < 32; i += 8) {
    const int r = r0 + i, c = c0 + tx;
    if (r < rows && c < cols) tile[i][tx] = x[off + (i64)r * cols + c];
  }
  __syncthreads();
  for (int i = ty; i < 32; i += 8) {
    const int c = c0 + i, r = r0 + tx;
    if (r < rows && c < cols) out[off + (i64)c * rows + r] = tile[tx][i];
  }
}

// Producers whose output two GEMMs read, each quantising it for both in one pass without storing it
// in f32: its 1x128 tiles (the Dgrad operand, row-major) and its 128x1 column tiles (the Wgrad
// operand; restarted at each segment, K-major with kpitch > 0 as quant_coltile lays them out). The
// values are computed once, into registers: a block takes one 128-row group (see col_group) of 128
// columns, warp w rows R w .. R w + R - 1 and lane l columns 4 l .. 4 l + 3 of each (R = 8: 512
// threads; SwiGLU's backward, with two such chunks a thread, R = 4 and 1,024 threads). A row's tile
// amax is then a warp reduction, a column's amax R rows in a thread and 128 / R warps through
// shared memory, and a column's K-major chunk one warp's store through shared memory. (With 16
// rows a thread, 256 threads and 96 registers, two blocks an SM kept a quarter of its warps busy:
// Nsight Compute showed these kernels latency-bound at 0.8-1.4 TB/s.)
// (Two kernels, one per copy, computed each value twice; SwiGLU's backward, RoPE and the
// concatenation use this, the combine's gradient keeps two kernels: see combine_grad_tile128.)
// Codes and scales are quant_tile128's and quant_coltile's: max is order-free and each code depends
// only on its value and its group's scale. Amax or unit scaling (tiles_cols_chunk); cols % 128 == 0;
// the segments partition the rows (expert offsets do), as every row's tiles are written by the block
// of its group.
template <int R>
struct TilesColsSmem {
  float part[128 / R][128];
  QScale sc[128];
  u32 kt[128][33];  // K-major codes, [column][4 rows a word] (a word's padding: 4-way bank conflicts)
};
#define TC_ROWS 8       // rows a warp of tiles_cols
#define TC_THREADS 512  // 32 * 128 / TC_ROWS
static_assert(TC_THREADS == 32 * 128 / TC_ROWS, "TC_ROWS rows a warp, 128 rows a block");

// One 128 x 128 chunk held as above (v[j]: row R w + j, zeros past the group's h rows), column
// chunk cb: writes its rows' tiles (tq, ts: [rows, cols / 128]) and its columns' tiles (q, scales).
// mode is SCALE_AMAX or SCALE_UNIT. Each warp reduces its R rows' amaxes, then lane j < R turns
// row j's into its scale (one scale computation, not R inlined copies of its divisions) and the
// others take its factor by a shuffle. Two calls in a row may share sm: every shared-memory write
// of the second comes after a barrier every thread reaches only once done reading the first's.
// ROWS false: the column tiles only (tq and ts unused).
template <int R, bool ROWS = true>
__device__ __forceinline__ void tiles_cols_chunk(const float4 (&v)[R], const ColGroup& g, int cb, u8* tq, float* ts,
                                                 u8* q, float* scales, int cols, int fmt, int mode, float eps,
                                                 i64 kpitch, TilesColsSmem<R>& sm) {
  static_assert(R == 4 || R == 8 || R == 16, "R rows a warp: 4, 8 or 16");
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, ng = cols / 128;
  const int c = cb * 128 + 4 * lane, r0 = R * w;
  if constexpr (ROWS) {
    float mine = 0.0f;
#pragma unroll
    for (int j = 0; j < R; j++) {
      const float a = warp_max(amax_add4(0.0f, v[j]));
      if (lane == j) mine = a;
    }
    const QScale rs = qscale(mine, eps, fmt, mode);
    if (lane < R && r0 + lane < g.h) ts[(i64)(g.a0 + r0 + lane) * ng + cb] = rs.scale;
#pragma unroll
    for (int j = 0; j < R; j++) {
      const float f = __shfl_sync(0xffffffffu, rs.factor, j);
      if (r0 + j < g.h)
        *(u32*)(tq + (i64)(g.a0 + r0 + j) * cols + c) = quant_mul4(v[j].x, v[j].y, v[j].z, v[j].w, f, f, f, f, fmt);
    }
  }
  float4 m = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int j = 0; j < R; j++) {
    m.x = amax_add(m.x, v[j].x), m.y = amax_add(m.y, v[j].y);
    m.z = amax_add(m.z, v[j].z), m.w = amax_add(m.w, v[j].w);
  }
  *(float4*)&sm.part[w][4 * lane] = m;
  __syncthreads();
  if (tid < 128) {
    float a = sm.part[0][tid];
#pragma unroll
    for (int k = 1; k < 128 / R; k++) a = fmaxf(a, sm.part[k][tid]);
    sm.sc[tid] = qscale(a, eps, fmt, mode);
    scales[g.soff + (i64)g.rb * cols + cb * 128 + tid] = sm.sc[tid].scale;
  }
  __syncthreads();
  const float f0 = sm.sc[4 * lane].factor, f1 = sm.sc[4 * lane + 1].factor, f2 = sm.sc[4 * lane + 2].factor,
              f3 = sm.sc[4 * lane + 3].factor;
  if (kpitch > 0) {
    // Column c + e's rows r0 .. r0 + R - 1 as R / 4 words of 4 rows (rows past h hold zeros: zero
    // codes, as quant_coltile writes them), transposed through shared memory so that each warp then
    // writes whole 128-byte column chunks: stored from registers, a lane's few bytes of each of
    // its four columns went to as many lines, 32 a store instruction (R = 4: 4,096 L1 wavefronts a
    // 128 x 128 chunk against 768 this way).
    const int lc = 4 * lane;  // the chunk's column c - 128 cb
#pragma unroll
    for (int k = 0; k < R / 4; k++) {
      const float4 a = v[4 * k], b = v[4 * k + 1], cc = v[4 * k + 2], d = v[4 * k + 3];
      sm.kt[lc][r0 / 4 + k] = quant_mul4(a.x, b.x, cc.x, d.x, f0, f0, f0, f0, fmt);
      sm.kt[lc + 1][r0 / 4 + k] = quant_mul4(a.y, b.y, cc.y, d.y, f1, f1, f1, f1, fmt);
      sm.kt[lc + 2][r0 / 4 + k] = quant_mul4(a.z, b.z, cc.z, d.z, f2, f2, f2, f2, fmt);
      sm.kt[lc + 3][r0 / 4 + k] = quant_mul4(a.w, b.w, cc.w, d.w, f3, f3, f3, f3, fmt);
    }
    __syncthreads();
    const i64 at = (g.soff / cols + g.rb) * 128 + 4 * lane;
    for (int col = w; col < 128; col += 128 / R)
      *(u32*)(q + (i64)(cb * 128 + col) * kpitch + at) = sm.kt[col][lane];
    return;
  }
#pragma unroll
  for (int j = 0; j < R; j++)
    if (r0 + j < g.h)
      *(u32*)(q + (i64)(g.a0 + r0 + j) * cols + c) = quant_mul4(v[j].x, v[j].y, v[j].z, v[j].w, f0, f1, f2, f3, fmt);
}

// The block's rows of column chunk blockIdx.x read through Values (at4) and quantised both ways.
// Grid (cols / 128, groups, pieces): quant_coltile's, 128 columns a block of TC_THREADS threads.
template <class Values, bool ROWS = true>
__device__ __forceinline__ void tiles_cols(Values x, u8* tq, float* ts, u8* q, float* scales, const ColGroup& g,
                                           int cols, int fmt, int mode, float eps, i64 kpitch,
                                           TilesColsSmem<TC_ROWS>& sm) {
  const int r0 = TC_ROWS * (threadIdx.x >> 5), c = blockIdx.x * 128 + 4 * (threadIdx.x & 31);
  float4 v[TC_ROWS];
#pragma unroll
  for (int j = 0; j < TC_ROWS; j++)
    v[j] = r0 + j < g.h ? x.at4(g.a0 + r0 + j, c, cols) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  tiles_cols_chunk<TC_ROWS, ROWS>(v, g, blockIdx.x, tq, ts, q, scales, cols, fmt, mode, eps, kpitch, sm);
}
#define TILES_COLS(VALUES)                                                \
  __shared__ TilesColsSmem<TC_ROWS> sm;                                   \
  ColGroup g;                                                             \
  if (!col_group(seg, nseg, rows, cols, &g)) return;                      \
  tiles_cols(VALUES, tq, ts, q, scales, g, cols, fmt, mode, eps, kpitch, sm)

// The MoE combine's gradient for the experts, d(ys)[r] = w[slot[r]] dy[slot[r] / k] (moe.cu's
// combine_bwd), handed to the experts' down projection quantised and never stored in f32: its f32
// copy (k rows of d per token and layer) was written once and read twice, by the two quantisers.
// The values are the f32 products combine_bwd writes, so the codes and scales are quantize(d(ys))'s.

// One 1x128 tile held by a warp, four values a lane (lane l: columns 4 l .. 4 l + 3): quant_tile128's
// amax, scale and codes; q4 is this lane's four codes, *scale the tile's scale (written by lane 0).
__device__ __forceinline__ void warp_tile_quant(const float (&v)[4], u8* q4, float* scale, int lane, int fmt,
                                                int mode, float eps) {
  float a = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; e++) a = amax_add(a, v[e]);
  a = warp_max(a);
  const QScale s = qscale(a, eps, fmt, mode);
  *(u32*)q4 = (u32)quant_value(v[0], s, fmt, mode) | ((u32)quant_value(v[1], s, fmt, mode) << 8) |
              ((u32)quant_value(v[2], s, fmt, mode) << 16) | ((u32)quant_value(v[3], s, fmt, mode) << 24);
  if (lane == 0) *scale = s.scale;
}

// combine_grad_tile128: one warp per row r of d(ys): dweights[slot[r]] = dy[n] . ys[r] in double, in
// combine_bwd's order, and the row's 1x128 tiles (d % 128 == 0: lane l holds columns 4 l .. 4 l + 3 of
// each tile) with quant_tile128's amax, scale and codes. ys f32 or BF16. (tiles_cols's one pass was
// slower here, 5.8 against 3.2 ms a small step: for dweights to sum in this order a block must walk
// every column chunk of its rows, and at 186 registers one block an SM kept too few loads in flight.)
template <typename Y>
__device__ void combine_grad_tile_rows(const float* dy, const Y* ys, const int* slot, const float* w,
                                       float* dweights, u8* q, float* scales, int rows, int k, int d, int fmt,
                                       int mode, float eps) {
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int i = slot[r], n = i / k;
  const float wi = w[i];
  const float* dyr = dy + (i64)n * d;
  const Y* ysr = ys + (i64)r * d;
  u8* qr = q + (i64)r * d;
  float* sr = scales + (i64)r * (d / 128);
  double dot = 0.0;
#pragma unroll 2
  for (int c0 = 0; c0 < d; c0 += 128) {
    const int c = c0 + lane * 4;
    const float4 g = *(const float4*)(dyr + c);
    const float4 yv = load_f32x4(ysr + c);
    dot += (double)g.x * (double)yv.x;
    dot += (double)g.y * (double)yv.y;
    dot += (double)g.z * (double)yv.z;
    dot += (double)g.w * (double)yv.w;
    const float v[4] = {wi * g.x, wi * g.y, wi * g.z, wi * g.w};
    warp_tile_quant(v, qr + c, sr + c0 / 128, lane, fmt, mode, eps);
  }
  dot = warp_sum(dot);
  if (lane == 0) dweights[i] = (float)dot;
}

KERNEL void combine_grad_tile128(const float* dy, const float* ys, const int* slot, const float* w, float* dweights,
                                 u8* q, float* scales, int rows, int k, int d, int fmt, int mode, float eps) {
  combine_grad_tile_rows(dy, ys, slot, w, dweights, q, scales, rows, k, d, fmt, mode, eps);
}
KERNEL void combine_grad_tile128_ys16(const float* dy, const u16* ys, const int* slot, const float* w,
                                      float* dweights, u8* q, float* scales, int rows, int k, int d, int fmt,
                                      int mode, float eps) {
  combine_grad_tile_rows(dy, ys, slot, w, dweights, q, scales, rows, k, d, fmt, mode, eps);
}

// d(ys)'s values read in place for coltile: row r is token slot[r] / k's gradient times w[slot[r]].
// The block's 128 rows' dy offsets and weights are looked up once into shared memory (off, wr; row
// a0 + j at j) before the staging loop, which then issues its dy loads without waiting on the slot
// and weight loads each of them needed (Nsight Compute: stalls on L1TEX scoreboard 35% of the time,
// 4 blocks an SM).
struct CombineGradValues {
  const float* dy;
  const i64* off;
  const float* wr;
  int a0;
  __device__ __forceinline__ float at(int r, int c, int cols) const { return wr[r - a0] * dy[off[r - a0] + c]; }
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const {
    const float wi = wr[r - a0];
    const float4 g = *(const float4*)(dy + off[r - a0] + c);
    return make_float4(wi * g.x, wi * g.y, wi * g.z, wi * g.w);
  }
};

// combine_grad_coltile: d(ys)'s column tiles (restarted at the experts' segments; K-major with
// kpitch > 0) by tiles_cols without the row tiles (combine_grad_tile128 writes those): grid (cols /
// 128, groups, 1), TC_THREADS threads, cols % 128 == 0. (Staged through shared memory as quant_coltile
// does, 64 columns a block, it ran at 1.3 TB/s with the L1 at 65%: the f32 values went in and out
// of shared memory once more than here.)
KERNEL void __launch_bounds__(TC_THREADS) combine_grad_coltile(const float* dy, const int* slot, const float* w, int k, u8* q,
                                                        float* scales, const int* seg, int nseg, int rows, int cols,
                                                        int fmt, int mode, float eps, i64 kpitch) {
  __shared__ TilesColsSmem<TC_ROWS> sm;
  __shared__ i64 off[128];
  __shared__ float wr[128];
  ColGroup grp;
  if (!col_group(seg, nseg, rows, cols, &grp)) return;
  if ((int)threadIdx.x < grp.h) {
    const int i = slot[grp.a0 + threadIdx.x];
    off[threadIdx.x] = (i64)(i / k) * cols;
    wr[threadIdx.x] = w[i];
  }
  __syncthreads();
  tiles_cols<CombineGradValues, false>(CombineGradValues{dy, off, wr, grp.a0}, nullptr, nullptr, q, scales, grp, cols,
                                       fmt, mode, eps, kpitch, sm);
}

// SwiGLU's backward, d[g | u] (nn.cu's swiglu_bwd: the fused gate|up projection's output gradient),
// handed to that projection quantised (k rows of 2 inter per token and layer for the experts). dh is
// f32 or BF16, gu f32 or BF16 (nn.cu's three combinations); inter % 128 == 0.
// tiles_cols's scheme over both halves at once: a block of 1,024 threads takes one 128-row group and
// column chunk cb of the gate half with the same chunk of the up half, warp w rows 4 w .. 4 w + 3
// and lane l columns 4 l .. 4 l + 3 of each half, so d, g and u are read once and swiglu_grad runs
// once per pair (with a block per half they were read twice); then tiles_cols_chunk quantises the
// gate chunk (column chunk cb) and the up chunk (inter / 128 + cb). (512 threads of 8 rows, at 99
// registers one block an SM, ran at 0.8 TB/s, latency-bound.)
template <typename D, typename T>
__device__ __forceinline__ void swiglu_grad_both(const D* dh, const T* gu, int inter, u8* tq, float* ts, u8* q,
                                                 float* scales, const int* seg, int nseg, int rows, int cols, int fmt,
                                                 int mode, float eps, i64 kpitch, TilesColsSmem<4>& sm) {
  ColGroup g;
  if (!col_group(seg, nseg, rows, cols, &g)) return;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, cb = blockIdx.x;
  const int c = cb * 128 + 4 * lane, r0 = 4 * w, h = g.h - r0;  // gate column c, up column inter + c
  float4 vg[4], vu[4];
#pragma unroll
  for (int j = 0; j < 4; j++) {
    vg[j] = vu[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (j < h) {
      const i64 r = g.a0 + r0 + j;
      const float4 d = load_f32x4(dh + r * inter + c), gg = load_f32x4(gu + r * cols + c),
                   u = load_f32x4(gu + r * cols + inter + c);
      swiglu_grad(d.x, gg.x, u.x, &vg[j].x, &vu[j].x);
      swiglu_grad(d.y, gg.y, u.y, &vg[j].y, &vu[j].y);
      swiglu_grad(d.z, gg.z, u.z, &vg[j].z, &vu[j].z);
      swiglu_grad(d.w, gg.w, u.w, &vg[j].w, &vu[j].w);
    }
  }
  tiles_cols_chunk<4>(vg, g, cb, tq, ts, q, scales, cols, fmt, mode, eps, kpitch, sm);
  tiles_cols_chunk<4>(vu, g, inter / 128 + cb, tq, ts, q, scales, cols, fmt, mode, eps, kpitch, sm);
}
#define SWIGLU_GRAD_QUANT(SUFFIX, D, T)                                                                     \
  KERNEL void __launch_bounds__(1024) swiglu_grad_quant##SUFFIX(const D* dh, const T* gu, int inter,        \
      u8* tq, float* ts, u8* q, float* scales, const int* seg, int nseg, int rows, int cols,                \
      int fmt, int mode, float eps, i64 kpitch) {                                                           \
    __shared__ TilesColsSmem<4> sm;                                                                         \
    swiglu_grad_both<D, T>(dh, gu, inter, tq, ts, q, scales, seg, nseg, rows, cols, fmt, mode, eps, kpitch, sm); \
  }
SWIGLU_GRAD_QUANT(_f32, float, float)
SWIGLU_GRAD_QUANT(_bf16, float, u16)
SWIGLU_GRAD_QUANT(_bf16_dh16, u16, u16)

// Backend.rope's output (x f32 [rows, heads * width]; width, offset, dim multiples of 4).
struct RopeValues {
  const float* x;
  const double* cs;
  int width, offset, dim, seqLen, inverse;
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const {
    return rope_group4(*(const float4*)(x + (i64)r * cols + c), cs, r, c, width, offset, dim, seqLen, inverse);
  }
};

// Backend.headConcat's output (a, b f32; la, lb, aw, a0 multiples of 4), as head_concat4 reads it.
struct HeadConcatValues {
  const float* a;
  const float* b;
  int heads, la, lb, bHeads, aw, a0;
  __device__ __forceinline__ float4 at4(int r, int c, int cols) const {
    const int w = la + lb, h = c / w, cc = c - h * w;
    const float* src = cc < la ? a + (i64)r * heads * aw + a0 + h * aw + cc
                               : b + (i64)r * bHeads * lb + (bHeads == 1 ? 0 : h) * lb + cc - la;
    return *(const float4*)src;
  }
};

KERNEL void __launch_bounds__(TC_THREADS) rope_quant(const float* x, const double* cs, int width, int offset, int dim,
                                              int seqLen, int inverse,
    u8* tq, float* ts, u8* q, float* scales, const int* seg, int nseg, int rows, int cols, int fmt, int mode,
    float eps, i64 kpitch) {
  TILES_COLS((RopeValues{x, cs, width, offset, dim, seqLen, inverse}));
}
KERNEL void __launch_bounds__(TC_THREADS) head_concat_quant(const float* a, const float* b, int heads, int la, int lb,
                                                     int bHeads, int aw, int a0,
    u8* tq, float* ts, u8* q, float* scales, const int* seg, int nseg, int rows, int cols, int fmt, int mode,
    float eps, i64 kpitch) {
  TILES_COLS((HeadConcatValues{a, b, heads, la, lb, bHeads, aw, a0}));
}
