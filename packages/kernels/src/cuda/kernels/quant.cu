// Fused FP8 quantisation (amax + scale + encode) for every group layout, bit-exact with the
// reference (fp8-core quantize): amax = max(max|x|, eps); inv = f32(FMAX / amax) with IEEE
// division; q = encode(f32(x * inv)); scale = f32(amax / FMAX). Scales are written in the
// Tensor's logical layout (FP8.md): tile [rows][ceil(cols/128)], block per matrix
// [ceil(rows/128)][ceil(cols/128)], column-tile per matrix or segment [ceil(rows/128)][cols],
// row [rows], tensor one per matrix. fmt: 0 E4M3, 1 E5M2; mode: 0 amax, 1 pow2, 2 unit.

// Row groups: each row of the R x C matrix split into groups of `gw` columns (tile: 128, row: C).
// Block (g, r) handles group g of row r; scales[r * ngroups + g].
KERNEL void quant_rowgroups(const float* x, u8* q, float* scales, int R, int C, int gw, int fmt, int mode, float eps) {
  const int g = blockIdx.x;
  const int r = blockIdx.y + blockIdx.z * 65535;
  if (r >= R) return;
  const int ngroups = cdiv(C, gw);
  const int c0 = g * gw;
  const int c1 = min(c0 + gw, C);
  const float* xr = x + (i64)r * C;
  float a = 0.0f;
  for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) a = fmaxf(a, abs_for_amax(xr[c]));
  a = block_max(a);
  const QScale s = qscale(a, eps, fmt, mode);
  for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) q[(i64)r * C + c] = quant_value(xr[c], s, fmt, mode);
  if (threadIdx.x == 0) scales[(i64)r * ngroups + g] = s.scale;
}

// 128x128 blocks of `batch` matrices of rows x cols. Block (cb, rb, b).
KERNEL void quant_block(const float* x, u8* q, float* scales, int rows, int cols, int fmt, int mode, float eps) {
  const int cb = blockIdx.x, rb = blockIdx.y, b = blockIdx.z;
  const int ncb = cdiv(cols, 128), nrb = cdiv(rows, 128);
  const int r0 = rb * 128, c0 = cb * 128;
  const int h = min(128, rows - r0), w = min(128, cols - c0);
  const i64 base = (i64)b * rows * cols;
  float a = 0.0f;
  for (int i = threadIdx.x; i < h * w; i += blockDim.x) {
    const int r = r0 + i / w, c = c0 + i % w;
    a = fmaxf(a, abs_for_amax(x[base + (i64)r * cols + c]));
  }
  a = block_max(a);
  const QScale s = qscale(a, eps, fmt, mode);
  for (int i = threadIdx.x; i < h * w; i += blockDim.x) {
    const i64 j = base + (i64)(r0 + i / w) * cols + (c0 + i % w);
    q[j] = quant_value(x[j], s, fmt, mode);
  }
  if (threadIdx.x == 0) scales[(i64)b * nrb * ncb + rb * ncb + cb] = s.scale;
}

// First row, row count and scale offset of piece p: a segment (when seg != 0) or matrix p.
__device__ __forceinline__ void piece_of(const int* seg, int p, int rows, int cols, int* r0, int* n, i64* soff) {
  if (seg) {
    *r0 = seg[p];
    *n = seg[p + 1] - seg[p];
    i64 o = 0;
    for (int e = 0; e < p; e++) o += (i64)cdiv(seg[e + 1] - seg[e], 128) * cols;
    *soff = o;
  } else {
    *r0 = p * rows;
    *n = rows;
    *soff = (i64)p * cdiv(rows, 128) * cols;
  }
}

// 128x1 column tiles, restarted at each piece (matrix, or expert segment when seg is given).
// Thread = one column of one 128-row group: grid (ceil(cols/blockDim), row groups bound, pieces).
KERNEL void quant_coltile(const float* x, u8* q, float* scales, const int* seg, int rows, int cols, int fmt, int mode, float eps) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int rb = blockIdx.y;
  int r0, n;
  i64 soff;
  piece_of(seg, blockIdx.z, rows, cols, &r0, &n, &soff);
  if (c >= cols || rb * 128 >= n) return;
  const int a0 = r0 + rb * 128;
  const int a1 = r0 + min(n, rb * 128 + 128);
  float a = 0.0f;
  for (int r = a0; r < a1; r++) a = fmaxf(a, abs_for_amax(x[(i64)r * cols + c]));
  const QScale s = qscale(a, eps, fmt, mode);
  for (int r = a0; r < a1; r++) q[(i64)r * cols + c] = quant_value(x[(i64)r * cols + c], s, fmt, mode);
  scales[soff + (i64)rb * cols + c] = s.scale;
}

// Tensor-wise, stage 1: amax of each of `batch` matrices of n elements, as f32 bits (max of
// non-negative floats is the max of their bits: deterministic with atomics). amax must be zeroed.
KERNEL void quant_tensor_amax(const float* x, u32* amax, i64 n) {
  const int b = blockIdx.y;
  float a = 0.0f;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    a = fmaxf(a, abs_for_amax(x[(i64)b * n + i]));
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

// decode(q) * scale for every element; `batch` matrices of rows x cols, or 2-D with segments.
// Rows outside every segment give 0.
KERNEL void dequant(const u8* q, const float* scales, float* out, const int* seg, int nseg, int batch, int rows, int cols, int group, int fmt) {
  const i64 total = (i64)batch * rows * cols;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(i % cols);
    const i64 R = i / cols;
    i64 si;
    if (seg) {
      int e = -1;
      i64 o = 0;
      for (int k = 0; k < nseg; k++) {
        if (R >= seg[k] && R < seg[k + 1]) { e = k; break; }
        o += scale_count(group, seg[k + 1] - seg[k], cols);
      }
      if (e < 0) { out[i] = 0.0f; continue; }
      si = o + scale_index(group, (int)(R - seg[e]), c, seg[e + 1] - seg[e], cols);
    } else {
      const int b = (int)(R / rows), r = (int)(R % rows);
      si = (i64)b * scale_count(group, rows, cols) + scale_index(group, r, c, rows, cols);
    }
    out[i] = __fmul_rn(decode_fp8(q[i], fmt), scales[si]);
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

// Transposes FP8 codes of `batch` matrices [rows][cols] -> [cols][rows] (for cuBLASLt operands).
KERNEL void transpose_u8(const u8* x, u8* out, int rows, int cols) {
  const i64 total = (i64)rows * cols;
  const i64 b = blockIdx.y;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const int r = (int)(i / cols), c = (int)(i % cols);
    out[b * total + (i64)c * rows + r] = x[b * total + i];
  }
}
