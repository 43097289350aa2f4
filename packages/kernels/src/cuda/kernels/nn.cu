// Dense layers' ops (the TypeScript reference: packages/tensor/src/ts/nn.ts). Row reductions sum
// in a fixed tree (per-thread or per-lane f32 partial sums, then double across threads); column
// reductions in two fixed stages, so results are deterministic. Elementwise arithmetic is f32:
// H200's FP64 conversions and exps made the double versions compute-bound (RMSNorm, SwiGLU).

// y = x * rstd * w per row; rstd = 1 / sqrt(mean(x^2) + eps). One block per row. vec4 (C % 4 == 0,
// 16-byte aligned rows, C <= 16 blockDim): each thread keeps its four-column groups in registers
// between the sum and the scaling.
// The vec4 path's row statistics, shared with rmsnorm_quant_tile so that both give s the same bits:
// thread t's four-column groups j (columns 4 (t + j blockDim.x), zeros past C) loaded into v, their
// squares summed in this order, the block's sum in double; returns s = 1 / sqrt(mean + eps).
__device__ __forceinline__ float rmsnorm_row_vec4(const float* xr, int C, double eps, float4 (&v)[4]) {
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int c = 4 * (threadIdx.x + j * blockDim.x);
    v[j] = c < C ? *(const float4*)(xr + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    ss = fmaf(v[j].x, v[j].x, fmaf(v[j].y, v[j].y, fmaf(v[j].z, v[j].z, fmaf(v[j].w, v[j].w, ss))));
  }
  const double t = block_sum((double)ss);
  return (float)(1.0 / sqrt(t / C + eps));
}

KERNEL void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int R, int C, double eps, int vec4) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const float* xr = x + (i64)r * C;
  float* yr = y + (i64)r * C;
  if (vec4) {
    float4 v[4];
    const float s = rmsnorm_row_vec4(xr, C, eps, v);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int c = 4 * (threadIdx.x + j * blockDim.x);
      if (c < C) {
        const float4 wv = *(const float4*)(w + c);
        *(float4*)(yr + c) = make_float4(v[j].x * s * wv.x, v[j].y * s * wv.y, v[j].z * s * wv.z, v[j].w * s * wv.w);
      }
    }
    if (threadIdx.x == 0) rstd[r] = s;
    return;
  }
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss = fmaf(xr[c], xr[c], ss);
  const double t = block_sum((double)ss);
  const float s = (float)(1.0 / sqrt(t / C + eps));
  for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = xr[c] * s * w[c];
  if (threadIdx.x == 0) rstd[r] = s;
}

// Four codes in one word (v.x in the low byte) of a group with scale s. Power-of-two scales divide,
// out of line (an IEEE division inlined per code multiplies NVRTC's compile time); the amax and unit
// scales multiply by the factor (1 for unit scales: x * 1 is x, NaN included).
__device__ __noinline__ u32 nn_quant4_pow2(float4 v, QScale s, int fmt) {
  return (u32)quant_value(v.x, s, fmt, SCALE_POW2) | ((u32)quant_value(v.y, s, fmt, SCALE_POW2) << 8) |
         ((u32)quant_value(v.z, s, fmt, SCALE_POW2) << 16) | ((u32)quant_value(v.w, s, fmt, SCALE_POW2) << 24);
}
__device__ __forceinline__ u32 nn_quant4(float4 v, QScale s, int fmt, int mode) {
  if (mode == SCALE_POW2) return nn_quant4_pow2(v, s, fmt);
  return quant_mul4(v.x, v.y, v.z, v.w, s.factor, s.factor, s.factor, s.factor, fmt);
}

// rmsnorm_fwd's vec4 path with y handed over as FP8 1x128 tiles (codes q, scales [R][C / 128]) instead
// of stored in f32: the next GEMM's input. C % 128 == 0 and C <= 4096: the 32 lanes of a warp hold
// the four-column groups of one tile for each j (columns 128 (w + 8 j) ..), so a tile's amax is a warp
// reduction. The sum, s and y are rmsnorm_fwd's own operations, the amax, scale and codes
// quant_tile128's: quantize(rmsnorm(x).y) bit for bit (rmsnorm_row_vec4 computes s for both).
KERNEL void rmsnorm_quant_tile(const float* x, const float* w, u8* q, float* scales, float* rstd, int R, int C,
                               double eps, int fmt, int mode, float qeps) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  float4 v[4];
  const float s = rmsnorm_row_vec4(x + (i64)r * C, C, eps, v);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int c = 4 * (threadIdx.x + j * blockDim.x);
    if (c >= C) continue;  // whole warps (C % 128 == 0)
    const float4 wv = *(const float4*)(w + c);
    const float4 y = make_float4(v[j].x * s * wv.x, v[j].y * s * wv.y, v[j].z * s * wv.z, v[j].w * s * wv.w);
    const float a = warp_max(amax_add4(0.0f, y));
    const QScale sc = qscale(a, qeps, fmt, mode);
    *(u32*)(q + (i64)r * C + c) = nn_quant4(y, sc, fmt, mode);
    if ((threadIdx.x & 31) == 0) scales[(i64)r * (C / 128) + c / 128] = sc.scale;
  }
  if (threadIdx.x == 0) rstd[r] = s;
}

// dx = s * (dy * w - x * s^2 * dot(dy * w, x) / C). One block per row.
KERNEL void rmsnorm_bwd_dx(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int R, int C) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const i64 o = (i64)r * C;
  const double s = rstd[r];
  double dot = 0.0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) dot += (double)dy[o + c] * (double)w[c] * (double)x[o + c];
  dot = block_sum(dot);
  const double k = s * s * dot / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    dx[o + c] = (float)(s * ((double)dy[o + c] * (double)w[c] - (double)x[o + c] * k));
}

// dw, stage 1: part[chunk][c] = sum over rows of chunk (`rowsPer` rows) of dy * x * rstd.
KERNEL void rmsnorm_bwd_dw_partial(const float* dy, const float* x, const float* rstd, double* part, int R, int C, int rowsPer) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int ch = blockIdx.y;
  if (c >= C) return;
  const int r0 = ch * rowsPer, r1 = min(R, r0 + rowsPer);
  double v = 0.0;
  for (int r = r0; r < r1; r++) v += (double)dy[(i64)r * C + c] * (double)x[(i64)r * C + c] * (double)rstd[r];
  part[(i64)ch * C + c] = v;
}

// dx and dw's partial sums in one read of dy and x, for C % 128 == 0 and C <= 1024 (the model's
// norms): a block takes RMS_ROWS rows (part's chunk), each warp every eighth of them, lane l the
// columns 4 l + 128 j. Per row the warp sums dot(dy * w, x) (f32 per lane, double across lanes; no
// block barrier) and writes dx as rmsnorm_bwd_dx does; each lane keeps its columns' f32 sums of
// dy * x * rstd over its rows, and the warps add theirs into part in double, in warp order. (Two
// kernels read dy and x twice: 2.8 ms of the step; this one in double arithmetic 2.2 ms.)
#define RMS_ROWS 128
// accum: dx is added into (dx = dx + value, addInto's f32 sum) instead of written.
KERNEL void __launch_bounds__(256) rmsnorm_bwd_fused(const float* dy, const float* x, const float* w,
                                                     const float* rstd, float* dx, double* part, int R, int C,
                                                     int accum) {
  __shared__ double acc_s[1024];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, K = C >> 7;
  const int r0 = blockIdx.x * RMS_ROWS, r1 = min(R, r0 + RMS_ROWS);
  float4 acc[8];
#pragma unroll
  for (int j = 0; j < 8; j++) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int r = r0 + warp; r < r1; r += 8) {
    const i64 o = (i64)r * C;
    const float s = rstd[r];
    float4 vd[8], vx[8], v0[8];
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      if (j < K) {
        const int c = 4 * lane + 128 * j;
        vd[j] = *(const float4*)(dy + o + c);
        vx[j] = *(const float4*)(x + o + c);
        // The gradient added into is loaded with the operands (after the arithmetic, its latency
        // was exposed: 2.10 against 1.30 ms a step).
        if (accum) v0[j] = *(const float4*)(dx + o + c);
        const float4 vw = *(const float4*)(w + c);
        dot = fmaf(vd[j].x * vw.x, vx[j].x, dot);
        dot = fmaf(vd[j].y * vw.y, vx[j].y, dot);
        dot = fmaf(vd[j].z * vw.z, vx[j].z, dot);
        dot = fmaf(vd[j].w * vw.w, vx[j].w, dot);
      }
    }
    const double dsum = warp_sum((double)dot);
    const float k = (float)((double)s * s * dsum / C);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      if (j < K) {
        const int c = 4 * lane + 128 * j;
        const float4 vw = *(const float4*)(w + c);
        float4 g = make_float4(s * (vd[j].x * vw.x - vx[j].x * k), s * (vd[j].y * vw.y - vx[j].y * k),
                               s * (vd[j].z * vw.z - vx[j].z * k), s * (vd[j].w * vw.w - vx[j].w * k));
        if (accum) g = make_float4(v0[j].x + g.x, v0[j].y + g.y, v0[j].z + g.z, v0[j].w + g.w);
        *(float4*)(dx + o + c) = g;
        acc[j].x = fmaf(vd[j].x * vx[j].x, s, acc[j].x);
        acc[j].y = fmaf(vd[j].y * vx[j].y, s, acc[j].y);
        acc[j].z = fmaf(vd[j].z * vx[j].z, s, acc[j].z);
        acc[j].w = fmaf(vd[j].w * vx[j].w, s, acc[j].w);
      }
    }
  }
  // The warps' column sums, added in warp order.
  for (int wv = 0; wv < 8; wv++) {
    if (warp == wv) {
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (j < K) {
          const float a[4] = {acc[j].x, acc[j].y, acc[j].z, acc[j].w};
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int c = 4 * lane + 128 * j + e;
            acc_s[c] = wv == 0 ? (double)a[e] : acc_s[c] + (double)a[e];
          }
        }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) part[(i64)blockIdx.x * C + c] = acc_s[c];
}

// Column sums of part [chunks][C] in chunk order, rounded to f32; accum: added into out (f32 sum).
KERNEL void colsum_final(const double* part, float* out, int chunks, int C, int accum) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double v = 0.0;
  for (int i = 0; i < chunks; i++) v += part[(i64)i * C + c];
  out[c] = accum ? out[c] + (float)v : (float)v;
}

// Interleaved-pair RoPE on [offset, offset + dim) of each head; position start + r % seqLen. The
// angles' cosines and sines are computed once per (seqLen, dim, start, theta) and kept by the backend
// (rope_table: seqLen x dim/2 of them, in double as the reference computes them; the inverse rotation
// negates the sines as it reads them), then rope_rows rotates and copies every row in one pass. (One
// thread per pair computing pow, cos and sin in double, and a second kernel copying the unrotated
// columns, took 3 ms of the small step for 32 calls; the table made per call, 0.2 ms.)
// cs[2 (p * half + i)] = cos and cs[2 (p * half + i) + 1] = sin of the angle (start + p) * theta^(-2i / dim).
KERNEL void rope_table(double* cs, int seqLen, int half, int dim, int start, double theta) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= seqLen * half) return;
  const int p = t / half, i = t - p * half;
  const double angle = (start + p) * pow(theta, (-2.0 * i) / dim);
  cs[2 * t] = cos(angle);
  cs[2 * t + 1] = sin(angle);
}

// y[i] = v as f32, or (out16) rounded to BF16 and stored in 2 bytes: the ops' storeBf16 option,
// the same values cast() gives, without an f32 copy in between.
__device__ __forceinline__ void store_out(void* y, i64 i, float v, int out16) {
  if (out16) ((u16*)y)[i] = f32_to_bf16(v);
  else ((float*)y)[i] = v;
}

// y[4 i .. 4 i + 3] = v, as f32 or (out16) rounded to BF16 (8 bytes).
__device__ __forceinline__ void store_out4(void* y, i64 i, float4 v, int out16) {
  if (out16) ((uint2*)y)[i] = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
  else ((float4*)y)[i] = v;
}

// One block per row: each element of the rotated slices is its pair's rotation (a c - b s for the
// first of the pair, a s + b c for the second, in double, rounded once), the others are copied.
KERNEL void rope_rows(const float* x, void* y, const double* cs, int R, int heads, int width, int offset, int dim,
                      int seqLen, int inverse, int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int n = heads * width, half = dim / 2;
  const float* xr = x + (i64)r * n;
  const i64 y0 = (i64)r * n;
  const double* rc = cs + 2 * (i64)(r % seqLen) * half;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int h = t / width, j = t - h * width - offset;
    if (j < 0 || j >= 2 * half) {
      store_out(y, y0 + t, xr[t], out16);
      continue;
    }
    const int i = j >> 1, a0 = t - (j & 1);
    const double c = rc[2 * i], sn = inverse ? -rc[2 * i + 1] : rc[2 * i + 1], a = xr[a0], b = xr[a0 + 1];
    store_out(y, y0 + t, (float)((j & 1) ? a * sn + b * c : a * c - b * sn), out16);
  }
}

// rope_rows four columns a thread (16-byte loads, 16- or 8-byte stores), when width, offset and dim
// are multiples of 4 (rope_group4 in common.cuh: the same arithmetic).
KERNEL void rope_rows4(const float* x, void* y, const double* cs, int R, int heads, int width, int offset, int dim,
                       int seqLen, int inverse, int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int n4 = heads * width / 4;
  const float4* xr = (const float4*)(x + (i64)r * heads * width);
  for (int t = threadIdx.x; t < n4; t += blockDim.x)
    store_out4(y, (i64)r * n4 + t, rope_group4(xr[t], cs, r, 4 * t, width, offset, dim, seqLen, inverse), out16);
}

// The head kernels below take one block per row (32-bit index arithmetic within it: a grid-stride
// loop dividing 64-bit element indices by the head width made them bound by integer division).
// y[r, h, 0:len] = x[r, h, start:start+len] (or summed over heads into [r, 0:len], heads in order).
KERNEL void head_slice(const float* x, void* y, int R, int heads, int width, int start, int len, int sumHeads,
                       int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int n = (sumHeads ? 1 : heads) * len;
  const float* xr = x + (i64)r * heads * width + start;
  const i64 y0 = (i64)r * n;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    if (sumHeads) {
      float v = 0.0f;
      for (int h = 0; h < heads; h++) v += xr[h * width + t];
      store_out(y, y0 + t, v, out16);
    } else {
      const int h = t / len;
      store_out(y, y0 + t, xr[h * width + t - h * len], out16);
    }
  }
}

// dst[r, h, start:start+len] += src[r, h, :].
KERNEL void head_scatter_add(float* dst, const float* src, int R, int heads, int width, int start, int len) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int n = heads * len;
  float* dr = dst + (i64)r * heads * width + start;
  const float* sr = src + (i64)r * n;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int h = t / len;
    float* d = dr + h * width + t - h * len;
    *d = *d + sr[t];
  }
}

// y[r, h] = [a[r, h, a0:a0+la] | b[r, bHeads == 1 ? 0 : h] (lb)], a's heads aw wide (aw = la, a0 = 0:
// whole heads).
KERNEL void head_concat(const float* a, const float* b, void* y, int R, int heads, int la, int lb, int bHeads,
                        int aw, int a0, int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int w = la + lb, n = heads * w;
  const float* ar = a + (i64)r * heads * aw + a0;
  const float* br = b + (i64)r * bHeads * lb;
  const i64 y0 = (i64)r * n;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int h = t / w, c = t - h * w;
    store_out(y, y0 + t, c < la ? ar[h * aw + c] : br[(bHeads == 1 ? 0 : h) * lb + c - la], out16);
  }
}

// head_slice and head_concat four columns a thread, when every width, start and length is a
// multiple of 4 (a group of four never straddles a head or the a|b boundary). The same values;
// head_slice's sum over heads in the same order.
KERNEL void head_slice4(const float* x, void* y, int R, int heads, int width, int start, int len, int sumHeads,
                        int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int l4 = len / 4, n4 = (sumHeads ? 1 : heads) * l4;
  const float* xr = x + (i64)r * heads * width + start;
  const i64 y0 = (i64)r * n4;
  for (int t = threadIdx.x; t < n4; t += blockDim.x) {
    float4 v;
    if (sumHeads) {
      v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int h = 0; h < heads; h++) {
        const float4 a = *(const float4*)(xr + h * width + 4 * t);
        v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
      }
    } else {
      const int h = t / l4;
      v = *(const float4*)(xr + h * width + 4 * (t - h * l4));
    }
    store_out4(y, y0 + t, v, out16);
  }
}

KERNEL void head_concat4(const float* a, const float* b, void* y, int R, int heads, int la, int lb, int bHeads,
                         int aw, int a0, int out16) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const int w4 = (la + lb) / 4, la4 = la / 4, n4 = heads * w4;
  const float* ar = a + (i64)r * heads * aw + a0;
  const float* br = b + (i64)r * bHeads * lb;
  const i64 y0 = (i64)r * n4;
  for (int t = threadIdx.x; t < n4; t += blockDim.x) {
    const int h = t / w4, c = t - h * w4;
    const float* src = c < la4 ? ar + h * aw + 4 * c : br + (bHeads == 1 ? 0 : h) * lb + 4 * (c - la4);
    store_out4(y, y0 + t, *(const float4*)src, out16);
  }
}

// SwiGLU over the fused gate|up projection's output: gu = [g | u] per row, [rows, 2 inter], in f32
// or, when the projection rounds its outputs to BF16 and they were saved that way, as BF16 codes
// (read directly, no f32 copy). h = silu(g) * u is [rows, inter]; the backward writes d[g | u] in
// gu's packed layout, the fused projection's Dgrad/Wgrad operand. Arithmetic in f32 with expf and
// IEEE divisions (within a few ulps of the ts reference's double arithmetic): in double, the four
// kernels took 3.7 ms of the small fp8 step, bound by FP64 exp, for about 1 ms of memory traffic.
// Four columns a thread when inter % 4 == 0 (16- or 8-byte accesses), else one.
// (sigmoid_f and swiglu_grad are in common.cuh: quant.cu's fused backward quantisers use them too.)
__device__ __forceinline__ float silu_mul(float g, float u) { return __fmul_rn(__fmul_rn(g, sigmoid_f(g)), u); }

// The element loops index with I = int when every index fits (fits_i32: the 64-bit division by
// `inter` per element cost more than the element's arithmetic), else with i64.
template <typename I, typename T>
__device__ __forceinline__ void swiglu_fwd_loop(const T* gu, float* h, I rows, int inter) {
  if ((inter & 3) == 0) {
    const int q = inter >> 2;
    const I n = rows * q;
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
      const I r = i / q, c = (i - r * q) * 4, gi = r * 2 * inter + c;
      const float4 g = load_f32x4(gu + gi), u = load_f32x4(gu + gi + inter);
      *(float4*)(h + r * inter + c) = make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z),
                                                  silu_mul(g.w, u.w));
    }
    return;
  }
  const I n = rows * inter;
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
    const I r = i / inter, c = i - r * inter;
    h[i] = silu_mul(load_f32(gu + r * 2 * inter + c), load_f32(gu + r * 2 * inter + inter + c));
  }
}
template <typename T>
__device__ __forceinline__ void swiglu_fwd_body(const T* gu, float* h, i64 rows, int inter) {
  if (fits_i32(2 * rows * inter)) swiglu_fwd_loop<int>(gu, h, (int)rows, inter);
  else swiglu_fwd_loop<i64>(gu, h, rows, inter);
}

template <typename I, typename D, typename T>
__device__ __forceinline__ void swiglu_bwd_loop(const D* dh, const T* gu, float* dgu, I rows, int inter) {
  if ((inter & 3) == 0) {
    const int q = inter >> 2;
    const I n = rows * q;
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
      const I r = i / q, c = (i - r * q) * 4, gi = r * 2 * inter + c;
      const float4 g = load_f32x4(gu + gi), u = load_f32x4(gu + gi + inter), d = load_f32x4(dh + r * inter + c);
      float4 dg, du;
      swiglu_grad(d.x, g.x, u.x, &dg.x, &du.x);
      swiglu_grad(d.y, g.y, u.y, &dg.y, &du.y);
      swiglu_grad(d.z, g.z, u.z, &dg.z, &du.z);
      swiglu_grad(d.w, g.w, u.w, &dg.w, &du.w);
      *(float4*)(dgu + gi) = dg;
      *(float4*)(dgu + gi + inter) = du;
    }
    return;
  }
  const I n = rows * inter;
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
    const I r = i / inter, c = i - r * inter;
    const I gi = r * 2 * inter + c, ui = gi + inter;
    swiglu_grad(load_f32(dh + i), load_f32(gu + gi), load_f32(gu + ui), dgu + gi, dgu + ui);
  }
}
template <typename D, typename T>
__device__ __forceinline__ void swiglu_bwd_body(const D* dh, const T* gu, float* dgu, i64 rows, int inter) {
  if (fits_i32(2 * rows * inter)) swiglu_bwd_loop<int>(dh, gu, dgu, (int)rows, inter);
  else swiglu_bwd_loop<i64>(dh, gu, dgu, rows, inter);
}

KERNEL void swiglu_fwd_f32(const float* gu, float* h, i64 rows, int inter) { swiglu_fwd_body(gu, h, rows, inter); }
KERNEL void swiglu_fwd_bf16(const u16* gu, float* h, i64 rows, int inter) { swiglu_fwd_body(gu, h, rows, inter); }
KERNEL void swiglu_bwd_f32(const float* dh, const float* gu, float* dgu, i64 rows, int inter) {
  swiglu_bwd_body(dh, gu, dgu, rows, inter);
}
KERNEL void swiglu_bwd_bf16(const float* dh, const u16* gu, float* dgu, i64 rows, int inter) {
  swiglu_bwd_body(dh, gu, dgu, rows, inter);
}
// dh in BF16 too (the down projection's Dgrad stored as BF16).
KERNEL void swiglu_bwd_bf16_dh16(const u16* dh, const u16* gu, float* dgu, i64 rows, int inter) {
  swiglu_bwd_body(dh, gu, dgu, rows, inter);
}

// swiglu handed over as FP8 1x128 tiles of h (codes q [rows][inter], scales [rows][inter / 128])
// instead of stored in f32: the down projection's input. inter % 128 == 0. quant_tile128's layout
// (eight lanes a tile, lane j columns 4 j + 32 i, four tiles a warp), each value swiglu_fwd's
// silu_mul: quantize(swiglu(gu)) bit for bit.
template <typename T>
__device__ __forceinline__ void swiglu_quant_body(const T* gu, u8* q, float* scales, int rows, int inter, int fmt,
                                                  int mode, float eps) {
  const int ng = inter / 128, j = threadIdx.x & 7;
  const int w = blockIdx.x * (blockDim.x / 8) + (threadIdx.x >> 3);
  const bool live = w < rows * ng;  // no early return: all eight lanes take part in the shuffles
  const int r = live ? w / ng : 0, g = live ? w - r * ng : 0;
  const T* gr = gu + (i64)r * 2 * inter + g * 128;
  float4 h[4];
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = 4 * j + 32 * i;
    h[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (live) {
      const float4 gv = load_f32x4(gr + c), uv = load_f32x4(gr + inter + c);
      h[i] = make_float4(silu_mul(gv.x, uv.x), silu_mul(gv.y, uv.y), silu_mul(gv.z, uv.z), silu_mul(gv.w, uv.w));
    }
    a = amax_add4(a, h[i]);
  }
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  if (!live) return;
  const QScale s = qscale(a, eps, fmt, mode);
  u8* qr = q + (i64)r * inter + g * 128;
#pragma unroll
  for (int i = 0; i < 4; i++) *(u32*)(qr + 4 * j + 32 * i) = nn_quant4(h[i], s, fmt, mode);
  if (j == 0) scales[w] = s.scale;
}
KERNEL void swiglu_quant_f32(const float* gu, u8* q, float* scales, int rows, int inter, int fmt, int mode,
                             float eps) {
  swiglu_quant_body(gu, q, scales, rows, inter, fmt, mode, eps);
}
KERNEL void swiglu_quant_bf16(const u16* gu, u8* q, float* scales, int rows, int inter, int fmt, int mode,
                              float eps) {
  swiglu_quant_body(gu, q, scales, rows, inter, fmt, mode, eps);
}

// out[n] = w[ids[n]]; an id outside [0, V) gives a zero row (and sets *bad).
KERNEL void embedding_fwd(const float* w, const int* ids, float* out, int N, int V, int d, int* bad) {
  const i64 total = (i64)N * d;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int n = (int)(t / d), c = (int)(t % d);
    const int id = ids[n];
    if (id < 0 || id >= V) {
      out[t] = 0.0f;
      if (bad) *bad = 1;
    } else {
      out[t] = w[(i64)id * d + c];
    }
  }
}

// dw[ids[n]] += dy[n], deterministic and in token order: block (columns, vocabulary slice s) adds
// the rows of the tokens whose id falls in its slice of at most EMB_IDS ids; no two threads touch the
// same element. The block lists a chunk's tokens of its slice (in order: a ballot per warp, the
// warps' counts in shared memory), then each thread adds their rows' values in its column into a
// shared-memory copy of its slice's rows of dw, read from dw when an id first occurs and written
// back at the end: each element is dw + dy[n1] + dy[n2] + ... in token order, the bits of adding in
// place, but eight tokens' values are in flight at once and a repeated id's adds wait on shared
// memory, not on a round trip to L2. With the byte-level corpus's 256 ids every token fell in one
// slice of the former 512 ids, and small's backward (adding into dw in place) took 5.8 ms on its
// text; this kernel 1.5 ms (0.6 on uniformly drawn bytes; H200, notes/step.md). (Each thread
// scanning every token id itself took 1.5 ms for small's 16,384 tokens.)
#define EMB_THREADS 128
#define EMB_IDS 64
KERNEL void __launch_bounds__(EMB_THREADS) embedding_bwd(float* dw, const float* dy, const int* ids, int N, int V,
                                                         int d, int slices) {
  __shared__ int tok[EMB_THREADS], tokId[EMB_THREADS], warpCount[EMB_THREADS / 32];
  __shared__ float acc[EMB_IDS][EMB_THREADS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = blockIdx.x * EMB_THREADS + tid;
  const int per = cdiv(V, slices);  // at most EMB_IDS (the host's choice of slices)
  const int v0 = blockIdx.y * per, v1 = min(V, v0 + per);
  unsigned long long seen = 0;  // the slice's ids met so far (the same in every thread)
  for (int base = 0; base < N; base += EMB_THREADS) {
    const int n = base + tid;
    const int id = n < N ? ids[n] : -1;
    const bool mine = id >= v0 && id < v1;
    const unsigned m = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warpCount[warp] = __popc(m);
    __syncthreads();
    int off = 0, count = 0;
#pragma unroll
    for (int w = 0; w < EMB_THREADS / 32; w++) {
      if (w < warp) off += warpCount[w];
      count += warpCount[w];
    }
    if (mine) {
      const int at = off + __popc(m & ((1u << lane) - 1u));
      tok[at] = n;
      tokId[at] = id;
    }
    __syncthreads();
    // Eight tokens' values loaded at once (in flight together), then added in token order.
    for (int j0 = 0; j0 < count; j0 += 8) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; u++) v[u] = j0 + u < count && c < d ? dy[(i64)tok[j0 + u] * d + c] : 0.0f;
#pragma unroll
      for (int u = 0; u < 8; u++) {
        if (j0 + u >= count) break;
        const int s = tokId[j0 + u] - v0;
        if (!((seen >> s) & 1ull)) {
          seen |= 1ull << s;
          acc[s][tid] = c < d ? dw[(i64)(v0 + s) * d + c] : 0.0f;
        }
        acc[s][tid] = acc[s][tid] + v[u];
      }
    }
    __syncthreads();  // the lists are rewritten by the next chunk
  }
  if (c < d)
    for (int s = 0; s < v1 - v0; s++)
      if ((seen >> s) & 1ull) dw[(i64)(v0 + s) * d + c] = acc[s][tid];
}
