// Elementwise ops, casts, the deterministic sum and small layout helpers. Grid-stride loops; the
// host picks the grid. f32 results of mixed f32/f64 expressions are computed in double and rounded
// once, as the TypeScript reference does (so they are bit-identical to it).

#define GRID_LOOP(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

KERNEL void add_f32(const float* a, const float* b, float* out, i64 n) {
  GRID_LOOP(i, n) out[i] = a[i] + b[i];
}

// dst += alpha * src.
KERNEL void add_into_f32(float* dst, const float* src, double alpha, i64 n) {
  GRID_LOOP(i, n) dst[i] = (float)((double)dst[i] + alpha * (double)src[i]);
}

KERNEL void scale_f32(const float* x, float* out, double s, i64 n) {
  GRID_LOOP(i, n) out[i] = (float)((double)x[i] * s);
}

KERNEL void f32_to_bf16(const float* x, u16* out, i64 n) {
  GRID_LOOP(i, n) out[i] = f32_to_bf16(x[i]);
}

// The same, four values per thread (x 16-byte and out 8-byte aligned: the host checks), then the
// n % 4 left over.
KERNEL void f32_to_bf16_x4(const float* x, u16* out, i64 n) {
  const i64 n4 = n / 4;
  GRID_LOOP(i, n4) {
    const float4 v = ((const float4*)x)[i];
    ((uint2*)out)[i] = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
  }
  GRID_LOOP(i, n - n4 * 4) out[n4 * 4 + i] = f32_to_bf16(x[n4 * 4 + i]);
}

KERNEL void bf16_to_f32(const u16* x, float* out, i64 n) {
  GRID_LOOP(i, n) out[i] = bf16_to_f32(x[i]);
}

// x rounded to BF16 values, kept in f32 (in place allowed).
KERNEL void round_bf16_f32(const float* x, float* out, i64 n) {
  GRID_LOOP(i, n) out[i] = round_bf16(x[i]);
}

// acc += round?(c): the accumulate step of a GEMM whose product went to a scratch buffer.
KERNEL void acc_add_f32(float* acc, const float* c, int roundBf16, i64 n) {
  GRID_LOOP(i, n) {
    const float v = roundBf16 ? round_bf16(c[i]) : c[i];
    acc[i] = acc[i] + v;
  }
}

// out (+)= round?(parts[0] + parts[1] + ... + parts[S-1]), each part n floats: the partial products of
// a GEMM split along K, summed in a fixed order (deterministic, unlike atomics), then treated as one
// product (rounded to BF16 when asked, added into out with accumulate).
KERNEL void sum_slices_f32(const float* parts, int S, float* out, int accumulate, int roundBf16, i64 n) {
  GRID_LOOP(i, n) {
    float v = parts[i];
    for (int s = 1; s < S; s++) v += parts[(i64)s * n + i];
    if (roundBf16) v = round_bf16(v);
    out[i] = accumulate ? out[i] + v : v;
  }
}

// out[r][c] = x[r][c] for c < C, 0 for C <= c < ld: an R x C f32 matrix copied with row stride ld
// (cuBLASLt reads 128x128 block scales with rows padded to a multiple of 4).
KERNEL void pad_rows_f32(const float* x, float* out, int R, int C, int ld) {
  GRID_LOOP(i, (i64)R * ld) {
    const int r = (int)(i / ld), c = (int)(i % ld);
    out[i] = c < C ? x[(i64)r * C + c] : 0.0f;
  }
}

// out[c][r] = x[r][c] for an R x C f32 matrix (the activation scales cuBLASLt reads M-contiguous).
KERNEL void transpose_f32(const float* x, float* out, int R, int C) {
  GRID_LOOP(i, (i64)R * C) {
    const int r = (int)(i / C), c = (int)(i % C);
    out[(i64)c * R + r] = x[i];
  }
}

// The same for `batch` matrices one after the other (the block scales of a stack of expert weights).
KERNEL void transpose_f32_batched(const float* x, float* out, int R, int C, int batch) {
  GRID_LOOP(i, (i64)batch * R * C) {
    const i64 b = i / ((i64)R * C), j = i % ((i64)R * C);
    const int r = (int)(j / C), c = (int)(j % C);
    out[b * R * C + (i64)c * R + r] = x[i];
  }
}

// Sum, stage 1: block b sums elements [b*chunk, (b+1)*chunk) in double with a fixed tree.
KERNEL void sum_partial(const float* x, double* part, i64 n, i64 chunk) {
  const i64 s = blockIdx.x * chunk;
  const i64 e = s + chunk < n ? s + chunk : n;
  double v = 0.0;
  for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) v += (double)x[i];
  v = block_sum(v);
  if (threadIdx.x == 0) part[blockIdx.x] = v;
}

// Sum, stage 2: one block adds the partial sums in a fixed order; out = f32(sum).
KERNEL void sum_final(const double* part, int nparts, float* out) {
  double v = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) v += part[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[0] = (float)v;
}


// x[r, c] += noise(seed, rowOffset + r, c) * scale in place (Backend.addUniformNoise): the noise
// uniform in [-1, 1) from a 32-bit mix of the seed and the position, the bits of the reference's
// uniformNoise (packages/tensor/src/backend.ts); the product and the sum rounded separately. With
// params, the seed and the scale's bits are read from there (a replayed graph's per-step values).
KERNEL void add_uniform_noise(float* x, int rows, int cols, u32 seed, int rowOffset, float scale, const u32* params) {
  if (params) {
    seed = params[0];
    scale = __uint_as_float(params[1]);
  }
  const i64 n = (i64)rows * cols;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const int r = (int)(i / cols), c = (int)(i - (i64)r * cols);
    u32 h = seed + (u32)(rowOffset + r) * 0x9e3779b1u + (u32)c * 0x85ebca77u;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    const float u = __fadd_rn(__fmul_rn((float)(h >> 8), 1.0f / 8388608.0f), -1.0f);
    x[i] = __fadd_rn(x[i], __fmul_rn(u, scale));
  }
}
