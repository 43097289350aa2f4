// Fused softmax cross-entropy and AdamW (the reference: packages/tensor/src/ts/moe.ts crossEntropy,
// packages/tensor/src/ts/backend.ts adamw). The global gradient norm is in elementwise.cu.

// One block per token row: loss_n = logsumexp(logits) - logits[target] (double), and
// dlogits = gradScale * softmax / N, minus gradScale / N at the target. A target outside
// [0, V) gives loss 0 and a zero gradient row, and sets *bad.
KERNEL void cross_entropy_rows(const float* logits, const int* targets, float* dlogits, double* lossRow, int N, int V, double gradScale, int* bad) {
  const int n = blockIdx.x + blockIdx.y * GRID_YZ_MAX;
  if (n >= N) return;
  const float* l = logits + (i64)n * V;
  float* d = dlogits + (i64)n * V;
  const int t = targets[n];
  if (t < 0 || t >= V) {
    for (int v = threadIdx.x; v < V; v += blockDim.x) d[v] = 0.0f;
    if (threadIdx.x == 0) {
      lossRow[n] = 0.0;
      if (bad) *bad = 1;
    }
    return;
  }
  float m = -f32_inf();
  for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, l[v]);
  m = block_maxf_any(m);
  double z = 0.0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) z += exp((double)l[v] - (double)m);
  z = block_sum(z);
  const double g = gradScale / N;
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    float x = (float)(gradScale * exp((double)l[v] - (double)m) / z / N);
    if (v == t) x = (float)((double)x - g);
    d[v] = x;
  }
  if (threadIdx.x == 0) lossRow[n] = (double)m + log(z) - (double)l[t];
}

// loss = sum_n lossRow[n] / N (one block, fixed order).
KERNEL void cross_entropy_final(const double* lossRow, int N, float* loss) {
  double v = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) v += lossRow[i];
  v = block_sum(v);
  if (threadIdx.x == 0) loss[0] = (float)(v / N);
}

// AdamW on f32 master weights, moments f32 (mBf16/vBf16 = 0) or BF16 (stored rounded, and the
// update uses the stored values); the gradient is multiplied by *gradScale (read on the device).
KERNEL void adamw(float* p, const float* g, void* m, void* v, int mBf16, int vBf16, const float* gradScale, i64 n,
                  double lr, double beta1, double beta2, double eps, double decay, double bc1, double bc2) {
  const double gs = gradScale[0];
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const double gi = (double)g[i] * gs;
    const double m0 = mBf16 ? (double)bf16_to_f32(((u16*)m)[i]) : (double)((float*)m)[i];
    const double v0 = vBf16 ? (double)bf16_to_f32(((u16*)v)[i]) : (double)((float*)v)[i];
    float m1 = (float)(beta1 * m0 + (1.0 - beta1) * gi);
    float v1 = (float)(beta2 * v0 + (1.0 - beta2) * gi * gi);
    if (mBf16) {
      const u16 h = f32_to_bf16(m1);
      ((u16*)m)[i] = h;
      m1 = bf16_to_f32(h);
    } else {
      ((float*)m)[i] = m1;
    }
    if (vBf16) {
      const u16 h = f32_to_bf16(v1);
      ((u16*)v)[i] = h;
      v1 = bf16_to_f32(h);
    } else {
      ((float*)v)[i] = v1;
    }
    p[i] = (float)((double)p[i] * decay - (lr * ((double)m1 / bc1)) / (sqrt((double)v1 / bc2) + eps));
  }
}
