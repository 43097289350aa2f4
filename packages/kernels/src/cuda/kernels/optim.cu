// Fused softmax cross-entropy, the global gradient norm and AdamW (the reference:
// packages/tensor/src/ts/moe.ts crossEntropy, packages/tensor/src/ts/backend.ts clipScale and
// adamw). The norm and AdamW each walk all the tensors in one launch, from a device table the host
// builds once for the optimiser's tensor list (cuda-backend/optim.ts): a row per tensor, its first
// block in a running count, and each block finds its row by binary search.

// One block per token row: loss_n = logsumexp(logits) - logits[target] (double), and
// dlogits = gradScale * softmax / N, minus gradScale / N at the target. A target outside
// [0, V) gives loss 0 and a zero gradient row, and sets *bad.
// Two passes over the row (it is read from memory twice, not three times): the max and the sum of
// exp(l - max) together (each thread keeps its own max and rescales its double sum when the max
// grows, the online softmax; the block combines them), then the gradient. Each logit's exp is an
// f32 expf (about an ulp; the sum stays in double, so the loss differs from the reference's
// all-double one by about 1e-7 relative), since double exps and divisions per logit made this kernel
// compute-bound on FP64: 5.3 ms of the small step at 32,768 classes with all three in double, 2.3 ms
// with a double exp per logit left in the sum.
// Four-wide loads and stores when V % 4 == 0.
__device__ __forceinline__ void ce_add(float x, float& m, double& z) {
  if (x > m) {
    z = m == -f32_inf() ? 0.0 : z * exp((double)m - (double)x);
    m = x;
  }
  if (x != -f32_inf()) z += (double)expf(x - m);  // (a -inf logit adds 0)
}

// Logits are read as f32 or BF16 values (l16: the output head's logits stored as BF16), and the
// gradient is written as f32 or rounded to BF16 (d16: for a head whose Dgrad and Wgrad read it in
// BF16, the values cast() would give).
__device__ __forceinline__ float ce_at(const float* l, int v) { return l[v]; }
__device__ __forceinline__ float ce_at(const u16* l, int v) { return bf16_to_f32(l[v]); }
__device__ __forceinline__ float4 ce_at4(const float* l, int v) { return *(const float4*)(l + v); }
__device__ __forceinline__ float4 ce_at4(const u16* l, int v) { return load_bf16x4(l + v); }
__device__ __forceinline__ void ce_put(float* d, int v, float x) { d[v] = x; }
__device__ __forceinline__ void ce_put(u16* d, int v, float x) { d[v] = f32_to_bf16(x); }
__device__ __forceinline__ void ce_put4(float* d, int v, float4 y) { *(float4*)(d + v) = y; }
__device__ __forceinline__ void ce_put4(u16* d, int v, float4 y) {
  *(uint2*)(d + v) = make_uint2(pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
}

#define CE_BATCH 4  // four-wide loads each thread issues together

template <typename L, typename D>
__device__ __forceinline__ void ce_row(const L* logits, const int* targets, D* dlogits, double* lossRow, int N, int V,
                                       double gradScale, int* bad) {
  const int n = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (n >= N) return;
  const L* l = logits + (i64)n * V;
  D* d = dlogits + (i64)n * V;
  const int t = targets[n];
  if (t < 0 || t >= V) {
    for (int v = threadIdx.x; v < V; v += blockDim.x) ce_put(d, v, 0.0f);
    if (threadIdx.x == 0) {
      lossRow[n] = 0.0;
      if (bad) *bad = 1;
    }
    return;
  }
  const bool vec = (V & 3) == 0;
  float m = -f32_inf();
  double z = 0.0;
  // The four-wide path takes CE_BATCH loads (4 CE_BATCH logits) at once and treats them as one
  // batch of the online softmax: the batch's max first, then the sum of their exps in f32 added to
  // the thread's double sum once. Per logit that is a max, a subtraction, an expf and an add, where
  // the logit-at-a-time update (a compare and branch, a conversion to double and a double add per
  // logit) left the kernel bound by instruction issue (Nsight Compute: SM 80% busy, DRAM 26%, 22 of
  // 32 lanes active). The batch sum in f32 (at most 4 CE_BATCH terms of at most 1) adds about 1e-6
  // relative to the loss's sum; the reference sums in double.
  const int step = blockDim.x * 4;
  if (vec) {
    for (int v0 = threadIdx.x * 4; v0 < V; v0 += CE_BATCH * step) {
      float4 x[CE_BATCH];
      float bm = -f32_inf();
#pragma unroll
      for (int u = 0; u < CE_BATCH; u++)
        if (v0 + u * step < V) {
          x[u] = ce_at4(l, v0 + u * step);
          bm = fmaxf(bm, fmaxf(fmaxf(x[u].x, x[u].y), fmaxf(x[u].z, x[u].w)));
        }
      if (bm > m) {
        z = m == -f32_inf() ? 0.0 : z * exp((double)m - (double)bm);
        m = bm;
      }
      if (m == -f32_inf()) continue;  // every logit so far is -inf: nothing to add
      float sb = 0.0f;
#pragma unroll
      for (int u = 0; u < CE_BATCH; u++)
        if (v0 + u * step < V)
          sb += expf(x[u].x - m) + expf(x[u].y - m) + expf(x[u].z - m) + expf(x[u].w - m);
      z += (double)sb;
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) ce_add(ce_at(l, v), m, z);
  }
  const float M = block_maxf_any(m);
  z = block_sum(m == -f32_inf() ? 0.0 : z * exp((double)m - (double)M));
  const double g = gradScale / N;
  const float c = (float)(gradScale / z / N);
  if (vec) {
    for (int v0 = threadIdx.x * 4; v0 < V; v0 += CE_BATCH * step) {
      float4 x[CE_BATCH];
#pragma unroll
      for (int u = 0; u < CE_BATCH; u++)
        if (v0 + u * step < V) x[u] = ce_at4(l, v0 + u * step);
#pragma unroll
      for (int u = 0; u < CE_BATCH; u++) {
        const int v = v0 + u * step;
        if (v >= V) continue;
        float4 y = make_float4(expf(x[u].x - M) * c, expf(x[u].y - M) * c, expf(x[u].z - M) * c, expf(x[u].w - M) * c);
        if (t >= v && t < v + 4) {
          float* e = &y.x + (t - v);
          *e = (float)((double)*e - g);
        }
        ce_put4(d, v, y);
      }
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      float x = expf(ce_at(l, v) - M) * c;
      if (v == t) x = (float)((double)x - g);
      ce_put(d, v, x);
    }
  }
  if (threadIdx.x == 0) lossRow[n] = (double)M + log(z) - (double)ce_at(l, t);
}

KERNEL void cross_entropy_rows(const void* logits, int l16, const int* targets, void* dlogits, int d16, double* lossRow,
                               int N, int V, double gradScale, int* bad) {
  if (l16 && d16) ce_row((const u16*)logits, targets, (u16*)dlogits, lossRow, N, V, gradScale, bad);
  else if (l16) ce_row((const u16*)logits, targets, (float*)dlogits, lossRow, N, V, gradScale, bad);
  else if (d16) ce_row((const float*)logits, targets, (u16*)dlogits, lossRow, N, V, gradScale, bad);
  else ce_row((const float*)logits, targets, (float*)dlogits, lossRow, N, V, gradScale, bad);
}

// loss = sum_n lossRow[n] / N (one block, fixed order).
KERNEL void cross_entropy_final(const double* lossRow, int N, float* loss) {
  double v = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) v += lossRow[i];
  v = block_sum(v);
  if (threadIdx.x == 0) loss[0] = (float)(v / N);
}

// The row of a table of T rows of `width` i64 whose entry `first` counts, in order, the blocks before
// that tensor's: the last row whose first block is at or before this block.
__device__ __forceinline__ const i64* table_row(const i64* tab, int T, int width, int first) {
  int lo = 0, hi = T - 1;
  const i64 b = blockIdx.x;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab[(i64)mid * width + first] <= b) lo = mid;
    else hi = mid - 1;
  }
  return tab + (i64)lo * width;
}

// Global gradient norm, stage 1: the sum of squares of a span of one tensor into part[blockIdx.x]
// (double). Each row: x, n (elements), part0 (the tensor's first partial), chunk (elements per
// partial); block part0 + j sums elements [j * chunk, (j + 1) * chunk) of x.
#define SUMSQ_ROW 4
KERNEL void sumsq_multi(const i64* tab, int T, double* part) {
  const i64* r = table_row(tab, T, SUMSQ_ROW, 2);
  const float* x = (const float*)r[0];
  const i64 n = r[1], chunk = r[3];
  const i64 s = (blockIdx.x - r[2]) * chunk;
  const i64 e = s + chunk < n ? s + chunk : n;
  double v = 0.0;
  for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) {
    const double t = (double)x[i];
    v += t * t;
  }
  v = block_sum(v);
  if (threadIdx.x == 0) part[blockIdx.x] = v;
}

// Stage 2: norm = sqrt(sum of the partials, in a fixed order), scale = min(1, maxNorm / (norm +
// 1e-6)) (1 when not finite).
KERNEL void clip_final(const double* part, int nparts, double maxNorm, float* norm, float* scale) {
  double v = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) v += part[i];
  v = block_sum(v);
  if (threadIdx.x == 0) {
    const double nrm = sqrt(v);
    norm[0] = (float)nrm;
    const bool finite = nrm == nrm && nrm < 1.0 / 0.0;
    double s = maxNorm / (nrm + 1e-6);
    scale[0] = finite ? (float)(s < 1.0 ? s : 1.0) : 1.0f;
  }
}

// AdamW on f32 master weights of many tensors, moments f32 or BF16 (stored rounded, and the update
// uses the stored values); the gradient is multiplied by *gradScale (read on the device). Each row:
// p, g, m, v, n (elements), chunk0 (the tensor's first block), flags (ADAMW_M_BF16, ADAMW_V_BF16,
// ADAMW_DECAY: the weight decay factor `decay` applies, else 1), unused; block chunk0 + j updates
// elements [j * ADAMW_CHUNK, (j + 1) * ADAMW_CHUNK) of that tensor.
// The update's arithmetic is f32 (the reference's is double: an update differs by an f32 rounding or
// two, far below an ulp of the weight it is added to). All in double, with divisions and a square
// root per element, the kernel took 5.3 ms for small's 467 M parameters, 2.7x its memory time. Each thread
// takes four consecutive elements per step (16- or 8-byte accesses; chunks and tensors start
// 16-byte aligned), the tensor's last few one at a time.
#define ADAMW_ROW 8
#define ADAMW_CHUNK 4096
#define ADAMW_M_BF16 1
#define ADAMW_V_BF16 2
#define ADAMW_DECAY 4
struct AdamWConst {
  double gs, beta1, beta2, c1, c2;
  float lr, eps, dec, ibc1, ibc2;
};
// One element: p, m and v updated in place (m and v as stored: BF16-rounded when so kept). The
// moments in double as the reference computes them (two FMAs: they round to the same f32, so to
// the same BF16, which f32 arithmetic missed often enough to move some weights by a BF16 ulp of
// their update); the update in f32.
__device__ __forceinline__ void adamw_elem(float& p, float g, float& m, float& v, bool mBf16, bool vBf16,
                                           const AdamWConst& k) {
  const double gi = (double)g * k.gs;
  float m1 = (float)(k.beta1 * (double)m + k.c1 * gi);
  float v1 = (float)(k.beta2 * (double)v + k.c2 * gi * gi);
  if (mBf16) m1 = bf16_to_f32(f32_to_bf16(m1));
  if (vBf16) v1 = bf16_to_f32(f32_to_bf16(v1));
  m = m1, v = v1;
  p = p * k.dec - (k.lr * (m1 * k.ibc1)) / (sqrtf(v1 * k.ibc2) + k.eps);
}
__device__ __forceinline__ float4 adamw_load4(const void* a, bool bf16, i64 i) {
  if (!bf16) return *(const float4*)((const float*)a + i);
  return load_bf16x4((const u16*)a + i);
}
__device__ __forceinline__ void adamw_store4(void* a, bool bf16, i64 i, float4 x) {
  if (!bf16) {
    *(float4*)((float*)a + i) = x;
    return;
  }
  // x holds BF16-exact values: their high halves are the codes.
  const uint2 w = make_uint2((__float_as_uint(x.x) >> 16) | (__float_as_uint(x.y) & 0xffff0000u),
                             (__float_as_uint(x.z) >> 16) | (__float_as_uint(x.w) & 0xffff0000u));
  *(uint2*)((u16*)a + i) = w;
}
KERNEL void adamw_multi(const i64* tab, int T, const float* gradScale, double lr, double beta1, double beta2,
                        double eps, double decay, double bc1, double bc2) {
  const i64* r = table_row(tab, T, ADAMW_ROW, 5);
  float* p = (float*)r[0];
  const float* g = (const float*)r[1];
  void* m = (void*)r[2];
  void* v = (void*)r[3];
  const i64 n = r[4];
  const int flags = (int)r[6];
  const bool mBf16 = flags & ADAMW_M_BF16, vBf16 = flags & ADAMW_V_BF16;
  const AdamWConst k = {(double)gradScale[0], beta1, beta2, 1.0 - beta1, 1.0 - beta2,
                        (float)lr, (float)eps, (float)((flags & ADAMW_DECAY) ? decay : 1.0),
                        (float)(1.0 / bc1), (float)(1.0 / bc2)};
  const i64 s = (blockIdx.x - r[5]) * (i64)ADAMW_CHUNK;
  const i64 e = s + ADAMW_CHUNK < n ? s + ADAMW_CHUNK : n;
  for (i64 i = s + 4 * (i64)threadIdx.x; i < e; i += 4 * (i64)blockDim.x) {
    if (i + 4 <= e) {
      float4 pv = *(const float4*)(p + i), gv = *(const float4*)(g + i);
      float4 mv = adamw_load4(m, mBf16, i), vv = adamw_load4(v, vBf16, i);
      adamw_elem(pv.x, gv.x, mv.x, vv.x, mBf16, vBf16, k);
      adamw_elem(pv.y, gv.y, mv.y, vv.y, mBf16, vBf16, k);
      adamw_elem(pv.z, gv.z, mv.z, vv.z, mBf16, vBf16, k);
      adamw_elem(pv.w, gv.w, mv.w, vv.w, mBf16, vBf16, k);
      *(float4*)(p + i) = pv;
      adamw_store4(m, mBf16, i, mv);
      adamw_store4(v, vBf16, i, vv);
    } else {
      for (i64 j = i; j < e; j++) {
        float mj = mBf16 ? bf16_to_f32(((const u16*)m)[j]) : ((const float*)m)[j];
        float vj = vBf16 ? bf16_to_f32(((const u16*)v)[j]) : ((const float*)v)[j];
        adamw_elem(p[j], g[j], mj, vj, mBf16, vBf16, k);
        if (mBf16) ((u16*)m)[j] = f32_to_bf16(mj);
        else ((float*)m)[j] = mj;
        if (vBf16) ((u16*)v)[j] = f32_to_bf16(vj);
        else ((float*)v)[j] = vj;
      }
    }
  }
}
