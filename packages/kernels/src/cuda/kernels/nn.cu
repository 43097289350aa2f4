// Dense layers' ops (the TypeScript reference: packages/tensor/src/ts/nn.ts). Row reductions run in
// double with a fixed tree; column reductions in two fixed stages, so results are deterministic.

// y = x * rstd * w per row; rstd = 1 / sqrt(mean(x^2) + eps). One block per row.
KERNEL void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int R, int C, double eps) {
  const int r = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (r >= R) return;
  const float* xr = x + (i64)r * C;
  double ss = 0.0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (double)xr[c] * (double)xr[c];
  ss = block_sum(ss);
  const double s = 1.0 / sqrt(ss / C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) y[(i64)r * C + c] = (float)((double)xr[c] * s * (double)w[c]);
  if (threadIdx.x == 0) rstd[r] = (float)s;
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

// Column sums of part [chunks][C] in chunk order, rounded to f32.
KERNEL void colsum_final(const double* part, float* out, int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double v = 0.0;
  for (int i = 0; i < chunks; i++) v += part[(i64)i * C + c];
  out[c] = (float)v;
}

// Interleaved-pair RoPE on [offset, offset + dim) of each head; position start + r % seqLen.
// One thread per (row, pair, head). The angle is computed in double, as the reference does.
KERNEL void rope(const float* x, float* y, int R, int heads, int width, int offset, int dim, int seqLen, int start,
                 double theta, int inverse) {
  const int half = dim / 2;
  const i64 total = (i64)R * heads * half;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int h = (int)(t % heads);
    const int i = (int)((t / heads) % half);
    const int r = (int)(t / ((i64)heads * half));
    const int pos = start + r % seqLen;
    const double angle = pos * pow(theta, (-2.0 * i) / dim);
    const double c = cos(angle);
    const double s = inverse ? -sin(angle) : sin(angle);
    const i64 j = (i64)r * heads * width + (i64)h * width + offset + 2 * i;
    const double a = x[j], b = x[j + 1];
    y[j] = (float)(a * c - b * s);
    y[j + 1] = (float)(a * s + b * c);
  }
}

// Copies the columns of x outside the rotated slices (rope writes only the slices).
KERNEL void rope_passthrough(const float* x, float* y, int R, int heads, int width, int offset, int dim) {
  const i64 total = (i64)R * heads * width;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(t % width);
    if (c < offset || c >= offset + dim) y[t] = x[t];
  }
}

// y[r, h, 0:len] = x[r, h, start:start+len] (or summed over heads into [r, 0:len]).
KERNEL void head_slice(const float* x, float* y, int R, int heads, int width, int start, int len, int sumHeads) {
  const int outHeads = sumHeads ? 1 : heads;
  const i64 total = (i64)R * outHeads * len;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(t % len);
    const int h = (int)((t / len) % outHeads);
    const int r = (int)(t / ((i64)outHeads * len));
    const float* xr = x + (i64)r * heads * width + start + c;
    if (sumHeads) {
      float v = 0.0f;
      for (int hh = 0; hh < heads; hh++) v += xr[(i64)hh * width];
      y[t] = v;
    } else {
      y[t] = xr[(i64)h * width];
    }
  }
}

// dst[r, h, start:start+len] += src[r, h, :].
KERNEL void head_scatter_add(float* dst, const float* src, int R, int heads, int width, int start, int len) {
  const i64 total = (i64)R * heads * len;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(t % len);
    const int h = (int)((t / len) % heads);
    const int r = (int)(t / ((i64)heads * len));
    float* d = dst + (i64)r * heads * width + (i64)h * width + start + c;
    *d = *d + src[t];
  }
}

// y[r, h] = [a[r, h] (la) | b[r, bHeads == 1 ? 0 : h] (lb)].
KERNEL void head_concat(const float* a, const float* b, float* y, int R, int heads, int la, int lb, int bHeads) {
  const int w = la + lb;
  const i64 total = (i64)R * heads * w;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(t % w);
    const int h = (int)((t / w) % heads);
    const int r = (int)(t / ((i64)heads * w));
    if (c < la) y[t] = a[(i64)r * heads * la + (i64)h * la + c];
    else y[t] = b[(i64)r * bHeads * lb + (i64)(bHeads == 1 ? 0 : h) * lb + (c - la)];
  }
}

__device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

// SwiGLU over the fused gate|up projection's output: gu = [g | u] per row, [rows, 2 inter], in f32
// or, when the projection rounds its outputs to BF16 and they were saved that way, as BF16 codes
// (read directly, no f32 copy). h = silu(g) * u is [rows, inter]; the backward writes d[g | u] in
// gu's packed layout, the fused projection's Dgrad/Wgrad operand. Arithmetic in double, rounded
// once, like the ts reference.
__device__ __forceinline__ double gu_at(const float* gu, i64 i) { return gu[i]; }
__device__ __forceinline__ double gu_at(const u16* gu, i64 i) { return bf16_to_f32(gu[i]); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_body(const T* gu, float* h, i64 rows, int inter) {
  const i64 n = rows * inter;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / inter, c = i - r * inter;
    const double gv = gu_at(gu, r * 2 * inter + c);
    h[i] = (float)(gv * sigmoid_d(gv) * gu_at(gu, r * 2 * inter + inter + c));
  }
}

template <typename D, typename T>
__device__ __forceinline__ void swiglu_bwd_body(const D* dh, const T* gu, float* dgu, i64 rows, int inter) {
  const i64 n = rows * inter;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / inter, c = i - r * inter;
    const i64 gi = r * 2 * inter + c, ui = gi + inter;
    const double gv = gu_at(gu, gi), s = sigmoid_d(gv), d = gu_at(dh, i);
    dgu[ui] = (float)(d * gv * s);
    dgu[gi] = (float)(d * gu_at(gu, ui) * s * (1.0 + gv * (1.0 - s)));
  }
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

// dw[ids[n]] += dy[n], deterministic: thread (column c, vocabulary slice s) adds, in token order,
// the rows of the tokens whose id falls in its slice; no two threads touch the same element.
KERNEL void embedding_bwd(float* dw, const float* dy, const int* ids, int N, int V, int d, int slices) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  if (c >= d) return;
  const int per = cdiv(V, slices);
  const int v0 = s * per, v1 = min(V, v0 + per);
  for (int n = 0; n < N; n++) {
    const int id = ids[n];
    if (id >= v0 && id < v1) {
      float* p = dw + (i64)id * d + c;
      *p = *p + dy[(i64)n * d + c];
    }
  }
}
