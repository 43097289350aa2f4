// Causal attention (the reference: packages/tensor/src/ts/nn.ts attention / attentionBackward).
// One warp per query row (forward, dq) or per key row (dk, dv): lanes hold columns of the head
// dimension, dot products are warp reductions with a fixed shuffle tree, so every result is
// deterministic (no atomics). precision bf16 (lowp = 1): q, k, v, dO and the probabilities are
// rounded to BF16; accumulation stays f32. Head dimensions up to 32 * MAXD.
// Layouts: q, k [B*T, H*dqk]; v, o, dO [B*T, H*dv]; lse and D [B*H*T] at (b*H + h)*T + i. The
// forward also takes Tk >= T keys per batch (k [B*Tk, H*dqk], v [B*Tk, H*dv]; Tk = T in training),
// the queries being the last T positions (a KV-cache decode step): query i sees keys 0..Tk-T+i.
// These are the simple kernels for every case: for BF16 attention with a head shape flash.cu
// instantiates, the host uses flash.cu's tensor-core kernels instead (unless MOE8_TENSOR_CORES=0).

#define MAXD 8
#define WARPS 4

__device__ __forceinline__ float ld(const float* p, int lowp) { return lowp ? round_bf16(*p) : *p; }

// sum_c a[c] * b[c] over a head row, a held by the lanes in registers (ra), b read from memory.
__device__ __forceinline__ float warp_dot(const float* ra, const float* b, int d, int lowp) {
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
#pragma unroll
  for (int t = 0; t < MAXD; t++) {
    const int c = lane + 32 * t;
    if (c < d) s = fmaf(ra[t], ld(b + c, lowp), s);
  }
  return warp_sum(s);
}

__device__ __forceinline__ void load_row(float* r, const float* p, int d, int lowp) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < MAXD; t++) {
    const int c = lane + 32 * t;
    r[t] = c < d ? ld(p + c, lowp) : 0.0f;
  }
}

KERNEL void __launch_bounds__(128) attn_fwd(const float* q, const float* k, const float* v, float* o, float* lse,
                                            int B, int T, int Tk, int H, int dqk, int dv, float scale, int lowp) {
  const int w = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (w >= B * H * T) return;
  const int lane = threadIdx.x & 31;
  const int i = w % T, bh = w / T, b = bh / H, h = bh % H;
  const int last = Tk - T + i;  // the query's own key position
  float qr[MAXD];
  load_row(qr, q + ((i64)(b * T + i) * H + h) * dqk, dqk, lowp);
  float m = -f32_inf(), l = 0.0f;
  for (int j = 0; j <= last; j++) {
    const float s = warp_dot(qr, k + ((i64)(b * Tk + j) * H + h) * dqk, dqk, lowp) * scale;
    if (s > m) {
      l = l * expf(m - s) + 1.0f;
      m = s;
    } else {
      l += expf(s - m);
    }
  }
  float acc[MAXD];
#pragma unroll
  for (int t = 0; t < MAXD; t++) acc[t] = 0.0f;
  for (int j = 0; j <= last; j++) {
    const float s = warp_dot(qr, k + ((i64)(b * Tk + j) * H + h) * dqk, dqk, lowp) * scale;
    float p = expf(s - m) / l;
    if (lowp) p = round_bf16(p);
    const float* vj = v + ((i64)(b * Tk + j) * H + h) * dv;
#pragma unroll
    for (int t = 0; t < MAXD; t++) {
      const int c = lane + 32 * t;
      if (c < dv) acc[t] = fmaf(p, ld(vj + c, lowp), acc[t]);
    }
  }
  float* oi = o + ((i64)(b * T + i) * H + h) * dv;
#pragma unroll
  for (int t = 0; t < MAXD; t++) {
    const int c = lane + 32 * t;
    if (c < dv) oi[c] = acc[t];
  }
  if (lane == 0) lse[(i64)bh * T + i] = m + logf(l);
}

// D_i = dO_i . o_i (dO rounded in bf16 mode, o as stored).
KERNEL void __launch_bounds__(128) attn_bwd_d(const float* dO, const float* o, float* D, int B, int T, int H, int dv, int lowp) {
  const int w = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (w >= B * H * T) return;
  const int i = w % T, bh = w / T, b = bh / H, h = bh % H;
  float r[MAXD];
  load_row(r, o + ((i64)(b * T + i) * H + h) * dv, dv, 0);
  const float d = warp_dot(r, dO + ((i64)(b * T + i) * H + h) * dv, dv, lowp);
  if ((threadIdx.x & 31) == 0) D[(i64)bh * T + i] = d;
}

// dq_i = sum_{j <= i} dS_ij k_j, dS = round(P (dP - D)) * scale.
KERNEL void __launch_bounds__(128) attn_bwd_dq(const float* dO, const float* q, const float* k, const float* v,
                                               const float* lse, const float* D, float* dq,
                                               int B, int T, int H, int dqk, int dv, float scale, int lowp) {
  const int w = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (w >= B * H * T) return;
  const int lane = threadIdx.x & 31;
  const int i = w % T, bh = w / T, b = bh / H, h = bh % H;
  float qr[MAXD], dor[MAXD], acc[MAXD];
  load_row(qr, q + ((i64)(b * T + i) * H + h) * dqk, dqk, lowp);
  load_row(dor, dO + ((i64)(b * T + i) * H + h) * dv, dv, lowp);
#pragma unroll
  for (int t = 0; t < MAXD; t++) acc[t] = 0.0f;
  const float L = lse[(i64)bh * T + i], Di = D[(i64)bh * T + i];
  for (int j = 0; j <= i; j++) {
    const float* kj = k + ((i64)(b * T + j) * H + h) * dqk;
    const float s = warp_dot(qr, kj, dqk, lowp);
    const float P = expf(s * scale - L);
    const float dP = warp_dot(dor, v + ((i64)(b * T + j) * H + h) * dv, dv, lowp);
    float dS = P * (dP - Di);
    if (lowp) dS = round_bf16(dS);
    dS *= scale;
#pragma unroll
    for (int t = 0; t < MAXD; t++) {
      const int c = lane + 32 * t;
      if (c < dqk) acc[t] = fmaf(dS, ld(kj + c, lowp), acc[t]);
    }
  }
  float* out = dq + ((i64)(b * T + i) * H + h) * dqk;
#pragma unroll
  for (int t = 0; t < MAXD; t++) {
    const int c = lane + 32 * t;
    if (c < dqk) out[c] = acc[t];
  }
}

// dk_j = sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} round(P_ij) dO_i.
KERNEL void __launch_bounds__(128) attn_bwd_dkdv(const float* dO, const float* q, const float* k, const float* v,
                                                 const float* lse, const float* D, float* dk, float* dvo,
                                                 int B, int T, int H, int dqk, int dv, float scale, int lowp) {
  const int w = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (w >= B * H * T) return;
  const int lane = threadIdx.x & 31;
  const int j = w % T, bh = w / T, b = bh / H, h = bh % H;
  float kr[MAXD], vr[MAXD], ak[MAXD], av[MAXD];
  load_row(kr, k + ((i64)(b * T + j) * H + h) * dqk, dqk, lowp);
  load_row(vr, v + ((i64)(b * T + j) * H + h) * dv, dv, lowp);
#pragma unroll
  for (int t = 0; t < MAXD; t++) ak[t] = av[t] = 0.0f;
  for (int i = j; i < T; i++) {
    const float* qi = q + ((i64)(b * T + i) * H + h) * dqk;
    const float* doi = dO + ((i64)(b * T + i) * H + h) * dv;
    const float s = warp_dot(kr, qi, dqk, lowp);
    const float P = expf(s * scale - lse[(i64)bh * T + i]);
    const float dP = warp_dot(vr, doi, dv, lowp);
    const float Pr = lowp ? round_bf16(P) : P;
    float dS = P * (dP - D[(i64)bh * T + i]);
    if (lowp) dS = round_bf16(dS);
    dS *= scale;
#pragma unroll
    for (int t = 0; t < MAXD; t++) {
      const int c = lane + 32 * t;
      if (c < dv) av[t] = fmaf(Pr, ld(doi + c, lowp), av[t]);
      if (c < dqk) ak[t] = fmaf(dS, ld(qi + c, lowp), ak[t]);
    }
  }
  float* okp = dk + ((i64)(b * T + j) * H + h) * dqk;
  float* ovp = dvo + ((i64)(b * T + j) * H + h) * dv;
#pragma unroll
  for (int t = 0; t < MAXD; t++) {
    const int c = lane + 32 * t;
    if (c < dqk) okp[c] = ak[t];
    if (c < dv) ovp[c] = av[t];
  }
}
