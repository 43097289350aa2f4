// Routing, dispatch/combine and load balancing (the reference: packages/tensor/src/ts/moe.ts).
// Everything stays on the device (docs/runtime.md rule 2) and is deterministic: the permutation is the
// reference's stable order (expert, then token, then rank) computed with per-chunk counts, a
// prefix sum in a fixed order and a stable in-chunk rank; no result depends on atomics' order.

__device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

// The most experts the router (a bit set per token) and the permute scan (a shared total per expert)
// handle.
#define ROUTER_MAX_EXPERTS 256
#define PERMUTE_MAX_EXPERTS 1024

// One thread per token: sigmoid scores, top-k of f32(score + bias) (ties to the lower expert),
// weights = scaling * s_i / sum of the selected s.
KERNEL void router(const float* logits, const float* bias, float* scores, int* topIdx, float* weights, int N, int E, int k, double scaling) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* lg = logits + (i64)n * E;
  float* sc = scores + (i64)n * E;
  for (int e = 0; e < E; e++) sc[e] = (float)sigmoid_d((double)lg[e]);
  u32 chosen[ROUTER_MAX_EXPERTS / 32] = {};  // a bit per expert
  double sum = 0.0;
  for (int j = 0; j < k; j++) {
    int best = -1;
    float bestV = -f32_inf();
    for (int e = 0; e < E; e++) {
      if (chosen[e >> 5] & (1u << (e & 31))) continue;
      const float v = sc[e] + bias[e];
      if (best < 0 || v > bestV) {
        best = e;
        bestV = v;
      }
    }
    chosen[best >> 5] |= 1u << (best & 31);
    topIdx[(i64)n * k + j] = best;
    sum += (double)sc[best];
  }
  for (int j = 0; j < k; j++)
    weights[(i64)n * k + j] = (float)(scaling * (double)sc[topIdx[(i64)n * k + j]] / sum);
}

// d(logits) from d(weights) (and an optional extra d(scores)), one thread per (token, expert).
KERNEL void router_bwd(const float* dweights, const float* scores, const int* topIdx, const float* dscores, float* dlogits, int N, int E, int k, double scaling) {
  const i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
  if (t >= (i64)N * E) return;
  const int n = (int)(t / E), e = (int)(t % E);
  double S = 0.0, dot = 0.0;
  for (int j = 0; j < k; j++) {
    const double s = scores[(i64)n * E + topIdx[(i64)n * k + j]];
    S += s;
    dot += (double)dweights[(i64)n * k + j] * s;
  }
  double ds = dscores ? (double)dscores[t] : 0.0;
  for (int j = 0; j < k; j++)
    if (topIdx[(i64)n * k + j] == e) ds += scaling * ((double)dweights[(i64)n * k + j] / S - dot / (S * S));
  const double s = scores[t];
  dlogits[t] = (float)(ds * s * (1.0 - s));
}

// Balance loss, stage 0: Z[n] = sum_e scores[n][e] in double, in the reference's order (so that
// stage 1 does not recompute it for every expert: E times less work).
KERNEL void balance_z(const float* scores, double* Z, int N, int E) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  double z = 0.0;
  for (int e = 0; e < E; e++) z += (double)scores[(i64)n * E + e];
  Z[n] = z;
}

// Balance loss, stage 1 (one thread per score): term[n][e] = s[n][e] / Z[n] / T in double, and the
// choice counts cnt[b][e] (integer atomics: exact, in any order). cnt must be zeroed.
KERNEL void balance_terms(const float* scores, const int* topIdx, const double* Zs, double* term, int* cnt, int B, int T, int E, int k) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 N = (i64)B * T;
  if (i < N * E) term[i] = (double)scores[i] / Zs[i / E] / T;
  if (i < N * k) atomicAdd(&cnt[(i / k / T) * E + topIdx[i]], 1);
}

// Balance loss, stage 2: per sequence b (one block), f[b][e] and P[b][e], and the sequence's loss
// term sum_e alpha f P / B. When E <= blockDim, P's sum over t is split into parts = blockDim / E
// consecutive ranges summed by parts threads at once and added in range order (one thread per
// expert walking all T tokens took 77 us a launch at small's 2,048 x 64: eight blocks, each a chain
// of dependent double adds); else one thread per expert sums all t.
__device__ __forceinline__ double balance_p(const double* term, int b, int T, int E, int e, int t0, int t1) {
  double p = 0.0;
  const double* col = term + (i64)b * T * E + e;
#pragma unroll 16
  for (int t = t0; t < t1; t++) p += col[(i64)t * E];
  return p;
}
KERNEL void balance_stats(const double* term, const int* cnt, double* f, double* P, double* lossPart, int B, int T, int E, int k, double alpha) {
  __shared__ double sp[1024];
  const int b = blockIdx.x, tid = threadIdx.x;
  double acc = 0.0;
  if (E <= (int)blockDim.x) {
    const int parts = blockDim.x / E, len = (T + parts - 1) / parts;
    const int e = tid % E, part = tid / E;
    if (part < parts) sp[tid] = balance_p(term, b, T, E, e, min(T, part * len), min(T, (part + 1) * len));
    __syncthreads();
    if (tid < E) {
      double p = 0.0;
      for (int i = 0; i < parts; i++) p += sp[i * E + tid];
      const double fe = cnt[(i64)b * E + tid] * ((double)E / ((double)k * T));
      f[(i64)b * E + tid] = fe;
      P[(i64)b * E + tid] = p;
      acc = alpha * fe * p / B;
    }
  } else {
    for (int e = tid; e < E; e += blockDim.x) {
      const double p = balance_p(term, b, T, E, e, 0, T);
      const double fe = cnt[(i64)b * E + e] * ((double)E / ((double)k * T));
      f[(i64)b * E + e] = fe;
      P[(i64)b * E + e] = p;
      acc += alpha * fe * p / B;
    }
  }
  acc = block_sum(acc);
  if (tid == 0) lossPart[b] = acc;
}

// Balance loss, stage 3: the loss (sum over sequences in order) ...
KERNEL void balance_loss(const double* lossPart, int B, float* loss) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double v = 0.0;
  for (int b = 0; b < B; b++) v += lossPart[b];
  loss[0] = (float)v;
}

// ... and d(loss)/d(scores) = alpha / (B T Z) (f_e - sum_e' f_e' s_e' / Z), one thread per token.
KERNEL void balance_grad(const float* scores, const double* f, float* dscores, int B, int T, int E, double alpha) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= B * T) return;
  const int b = n / T;
  const float* s = scores + (i64)n * E;
  double Z = 0.0;
  for (int e = 0; e < E; e++) Z += (double)s[e];
  double fp = 0.0;
  for (int e = 0; e < E; e++) fp += f[(i64)b * E + e] * (double)s[e] / Z;
  for (int e = 0; e < E; e++) dscores[(i64)n * E + e] = (float)(alpha / ((double)B * T * Z) * (f[(i64)b * E + e] - fp));
}

#define PCHUNK 256

// Permute, stage 1: per chunk of PCHUNK selections, how many go to each expert: counts[chunk][e].
KERNEL void permute_count(const int* topIdx, int* counts, int total, int E) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int i = blockIdx.x * PCHUNK + threadIdx.x;
  if (threadIdx.x < PCHUNK && i < total) atomicAdd(&hist[topIdx[i]], 1);  // counts: order-free
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[(i64)blockIdx.x * E + e] = hist[e];
}

// Permute, stage 2 (one block): offsets[e] (E+1) and base[chunk][e], the first row of the chunk's
// selections of expert e, by prefix sums in a fixed order.
KERNEL void permute_scan(const int* counts, int* base, int* offsets, int chunks, int E) {
  __shared__ int tot[PERMUTE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int s = 0;
    for (int c = 0; c < chunks; c++) s += counts[(i64)c * E + e];
    tot[e] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int e = 0; e < E; e++) {
      offsets[e] = s;
      s += tot[e];
    }
    offsets[E] = s;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int s = offsets[e];
    for (int c = 0; c < chunks; c++) {
      base[(i64)c * E + e] = s;
      s += counts[(i64)c * E + e];
    }
  }
}

// Permute, stage 3: slot[row] = selection index, each selection placed after the earlier ones of
// its expert (stable): its rank among the chunk's earlier selections of the same expert.
KERNEL void permute_scatter(const int* topIdx, const int* base, int* slot, int* pos, int total, int E) {
  __shared__ int ex[PCHUNK];
  const int i = blockIdx.x * PCHUNK + threadIdx.x;
  ex[threadIdx.x] = i < total ? topIdx[i] : -1;
  __syncthreads();
  if (i >= total) return;
  const int e = ex[threadIdx.x];
  int rank = 0;
  for (int t = 0; t < (int)threadIdx.x; t++) rank += ex[t] == e;
  const int row = base[(i64)blockIdx.x * E + e] + rank;
  slot[row] = i;
  if (pos) pos[i] = row;
}

// xs[r] = x[slot[r] / k].
template <typename I>
__device__ __forceinline__ void gather_loop(const float* x, const int* slot, float* xs, I rows, int d, int k) {
  const I total = rows * d;
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
    const I r = t / d, c = t - r * d;
    xs[t] = x[(i64)(slot[r] / k) * d + c];
  }
}
KERNEL void gather_rows(const float* x, const int* slot, float* xs, int rows, int d, int k) {
  if (fits_i32((i64)rows * d)) gather_loop<int>(x, slot, xs, rows, d, k);
  else gather_loop<i64>(x, slot, xs, rows, d, k);
}

// pos[slot[r]] = r (the inverse permutation).
KERNEL void invert_slots(const int* slot, int* pos, int rows) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < rows) pos[slot[r]] = r;
}


// dx[n] = sum_j dxs[pos[n k + j]] (f32, in order of j). dxs is f32, or BF16 when the experts' Dgrad
// stores its (BF16-rounded) result that way.
// The element loops take four adjacent columns per thread when d % 4 == 0 (wider loads; each column's
// sum in the same order as one at a time), and 32-bit indices when they fit.
template <typename I, typename Y>
__device__ __forceinline__ void permute_bwd_loop(const Y* dxs, const int* pos, float* dx, I N, int k, int d) {
  if ((d & 3) == 0) {
    const int d4 = d >> 2;
    const I total = N * d4;
    for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
      const I n = t / d4, c = (t - n * d4) * 4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int j = 0; j < k; j++) {
        const float4 y = load_f32x4(dxs + (i64)pos[(i64)n * k + j] * d + c);
        v.x += y.x, v.y += y.y, v.z += y.z, v.w += y.w;
      }
      *(float4*)(dx + (i64)n * d + c) = v;
    }
    return;
  }
  const I total = N * d;
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
    const I n = t / d, c = t - n * d;
    float v = 0.0f;
    for (int j = 0; j < k; j++) v += load_f32(dxs + (i64)pos[(i64)n * k + j] * d + c);
    dx[t] = v;
  }
}
template <typename Y>
__device__ __forceinline__ void permute_bwd_body(const Y* dxs, const int* pos, float* dx, int N, int k, int d) {
  if (fits_i32((i64)N * d)) permute_bwd_loop<int>(dxs, pos, dx, N, k, d);
  else permute_bwd_loop<i64>(dxs, pos, dx, N, k, d);
}

KERNEL void permute_bwd(const float* dxs, const int* pos, float* dx, int N, int k, int d) {
  permute_bwd_body(dxs, pos, dx, N, k, d);
}
KERNEL void permute_bwd16(const u16* dxs, const int* pos, float* dx, int N, int k, int d) {
  permute_bwd_body(dxs, pos, dx, N, k, d);
}

// y[n] = sum_j w[n k + j] ys[pos[n k + j]] (double accumulation, rounded to f32), then + a0[n] and
// + a1[n] when given (f32 additions in that order: the same values as adding them afterwards, without
// the passes: the MoE layer adds its shared experts' output and the residual here). ys f32 or BF16.
__device__ __forceinline__ float4 add4(float4 v, const float* a, i64 i) {
  if (!a) return v;
  const float4 b = *(const float4*)(a + i);
  return make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
}
template <typename I, typename Y>
__device__ __forceinline__ void combine_loop(const Y* ys, const int* pos, const float* w, const float* a0,
                                             const float* a1, float* y, I N, int k, int d) {
  if ((d & 3) == 0) {
    const int d4 = d >> 2;
    const I total = N * d4;
    for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
      const I n = t / d4, c = (t - n * d4) * 4;
      double v0 = 0.0, v1 = 0.0, v2 = 0.0, v3 = 0.0;
      for (int j = 0; j < k; j++) {
        const double wj = w[(i64)n * k + j];
        const float4 a = load_f32x4(ys + (i64)pos[(i64)n * k + j] * d + c);
        v0 += wj * (double)a.x, v1 += wj * (double)a.y, v2 += wj * (double)a.z, v3 += wj * (double)a.w;
      }
      const i64 i = (i64)n * d + c;
      *(float4*)(y + i) = add4(add4(make_float4((float)v0, (float)v1, (float)v2, (float)v3), a0, i), a1, i);
    }
    return;
  }
  const I total = N * d;
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
    const I n = t / d, c = t - n * d;
    double v = 0.0;
    for (int j = 0; j < k; j++)
      v += (double)w[(i64)n * k + j] * (double)load_f32(ys + (i64)pos[(i64)n * k + j] * d + c);
    float f = (float)v;
    if (a0) f = f + a0[t];
    if (a1) f = f + a1[t];
    y[t] = f;
  }
}
template <typename Y>
__device__ __forceinline__ void combine_body(const Y* ys, const int* pos, const float* w, const float* a0,
                                             const float* a1, float* y, int N, int k, int d) {
  if (fits_i32((i64)N * d)) combine_loop<int>(ys, pos, w, a0, a1, y, N, k, d);
  else combine_loop<i64>(ys, pos, w, a0, a1, y, N, k, d);
}

KERNEL void combine(const float* ys, const int* pos, const float* w, const float* a0, const float* a1, float* y,
                    int N, int k, int d) {
  combine_body(ys, pos, w, a0, a1, y, N, k, d);
}
KERNEL void combine16(const u16* ys, const int* pos, const float* w, const float* a0, const float* a1, float* y,
                      int N, int k, int d) {
  combine_body(ys, pos, w, a0, a1, y, N, k, d);
}

// dys[r] = w[slot[r]] dy[slot[r] / k]; dweights[slot[r]] = dy[n] . ys[r]. One warp per row r.
// ys is f32, or BF16 when the experts' outputs are BF16 values anyway (kept at half the bytes).
// When d % 4 == 0 each lane takes four adjacent columns per load (16-byte dy and dys accesses;
// scalar loads left the kernel latency-bound at a third of the memory bandwidth).
template <typename Y>
__device__ void combine_bwd_rows(const float* dy, const Y* ys, const int* slot, const float* w, float* dys,
                                 float* dweights, int rows, int k, int d) {
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int i = slot[r];
  const int n = i / k;
  const float wi = w[i];
  const float* dyr = dy + (i64)n * d;
  const Y* ysr = ys + (i64)r * d;
  float* dysr = dys + (i64)r * d;
  double dot = 0.0;
  if ((d & 3) == 0) {
#pragma unroll 4
    for (int c = lane * 4; c < d; c += 128) {
      const float4 g = *(const float4*)(dyr + c);
      const float4 yv = load_f32x4(ysr + c);
      *(float4*)(dysr + c) = make_float4(wi * g.x, wi * g.y, wi * g.z, wi * g.w);
      dot += (double)g.x * (double)yv.x;
      dot += (double)g.y * (double)yv.y;
      dot += (double)g.z * (double)yv.z;
      dot += (double)g.w * (double)yv.w;
    }
  } else {
    for (int c = lane; c < d; c += 32) {
      const float g = dyr[c];
      dysr[c] = wi * g;
      dot += (double)g * (double)load_f32(ysr + c);
    }
  }
  dot = warp_sum(dot);
  if (lane == 0) dweights[i] = (float)dot;
}

KERNEL void combine_bwd(const float* dy, const float* ys, const int* slot, const float* w, float* dys, float* dweights, int rows, int k, int d) {
  combine_bwd_rows(dy, ys, slot, w, dys, dweights, rows, k, d);
}

KERNEL void combine_bwd_ys16(const float* dy, const u16* ys, const int* slot, const float* w, float* dys, float* dweights, int rows, int k, int d) {
  combine_bwd_rows(dy, ys, slot, w, dys, dweights, rows, k, d);
}

// The bias update rules (Backend.biasUpdate's `rule`).
#define BIAS_SIGN 0
#define BIAS_ERROR 1
#define BIAS_CLIPPED 2

// The correction bias update, loads from the permute offsets: bias_e += gamma * sign(mean - load_e)
// (BIAS_SIGN) or gamma * (mean - load_e) / mean (BIAS_ERROR; BIAS_CLIPPED: that relative error
// clipped to [-1, 1]), in f64 with one rounding per bias.
KERNEL void bias_update(float* bias, const int* offsets, int E, double gamma, int rule) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const double mean = (double)(offsets[E] - offsets[0]) / E;
  if (!(mean > 0)) return;  // no token was routed: no load to balance
  const double load = offsets[e + 1] - offsets[e];
  const double d = mean - load;
  const double err = d / mean;
  const double step = rule == BIAS_SIGN      ? (d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0))
                      : rule == BIAS_CLIPPED ? fmin(1.0, fmax(-1.0, err))
                                             : err;
  bias[e] = (float)((double)bias[e] + gamma * step);
}
