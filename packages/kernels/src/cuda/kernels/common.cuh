// Shared by every kernel module (prepended to each .cu before NVRTC compiles it). Self-contained:
// no CUDA headers, so NVRTC needs no include path; BF16 and FP8 are handled as raw bits with the
// exact conversions of docs/numerics.md (RNE from the f32 bits, FP8 saturating, NaN -> 0x7f).
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define KERNEL extern "C" __global__

// The integer #defines of this file and of each module are copied into TypeScript by
// packages/kernels/scripts/kernel-signatures.ts (src/cuda/kernels.generated.ts): the host passes
// these codes and sizes grids with these limits without restating them.

// Quantisation group codes (the `group` arguments of the quantisation and GEMM kernels).
#define G_TILE 0
#define G_BLOCK 1
#define G_COLTILE 2
#define G_ROW 3
#define G_TENSOR 4

// FP8 format codes (the `fmt` arguments; the codecs below test fmt != 0 for E5M2).
#define FMT_E4M3 0
#define FMT_E5M2 1

// Scale modes (the `mode` arguments of the quantisation kernels; see qscale below).
#define SCALE_AMAX 0
#define SCALE_POW2 1
#define SCALE_UNIT 2

// GEMM grouping modes (the `mode` argument of every gemm.cu and gemm16.cu kernel): one product;
// segments along M (rows off[e]..off[e+1]-1 of A and C use expert e's matrix of B); segments along K
// (C[e] = A_e^T B_e over rows off[e]..off[e+1]-1 of A and B).
#define GEMM_PLAIN 0
#define GEMM_SEGMENT_M 1
#define GEMM_SEGMENT_K 2

// The largest gridDim.y and gridDim.z. Kernels with one block per row take the rows in chunks of
// this many along one grid dimension and the chunks along the next (row = x + y * GRID_YZ_MAX).
#define GRID_YZ_MAX 65535

__device__ __forceinline__ float f32_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN -> 0x7fff (canonical, as __float2bfloat16_rn); overflow -> inf. From
// sm_80 on the conversion instruction gives these bits (one instruction where the integer rounding
// took five: the BF16-storing kernels were bound by integer issue, Nsight Compute on the
// cross-entropy); the integer form stays for older GPUs.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
#if __CUDA_ARCH__ >= 800
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#else
  u32 b = __float_as_uint(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
#endif
}

__device__ __forceinline__ float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
// Four BF16 values at p (8-byte aligned) as f32, in one load.
__device__ __forceinline__ float4 load_bf16x4(const u16* p) {
  const uint2 w = *(const uint2*)p;
  return make_float4(bf16_to_f32(w.x & 0xffff), bf16_to_f32(w.x >> 16), bf16_to_f32(w.y & 0xffff),
                     bf16_to_f32(w.y >> 16));
}

// A value stored as f32 or as BF16 codes, read as f32 (one kernel body for both storages), and four
// adjacent ones (16-byte aligned f32, 8-byte aligned BF16) in one load.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const u16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ float4 load_f32x4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 load_f32x4(const u16* p) { return load_bf16x4(p); }

// Two values as the BF16 pair of one 32-bit MMA operand register (lo in the low half).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
#endif
}

// c += a @ b on tensor cores, BF16 inputs and f32 accumulation (mma.sync m16n8k16; fragment
// layouts in flash.cu's header). Used by the GEMM tiles and by the attention kernels.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory address of a generic pointer (for ldmatrix and cp.async).
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// Asynchronous global -> shared copies (cp.async, sm_80+): `bytes` of 16 or 4; with !in the
// destination is zero-filled and nothing is read.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* s, const void* g, bool in) {
  if (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(s)), "l"(g), "r"(in ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(s)), "l"(g), "r"(in ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// FP8 encode from the f32 bits (fmt 0 = E4M3 OCP e4m3fn, 1 = E5M2): round to nearest even,
// subnormals kept, saturating to +-max (infinities too), every NaN -> 0x7f, -0 keeps its sign.
// On sm_89+ one cvt.rn.satfinite instruction does exactly this (RNE, subnormals, saturation of
// overflow and infinities to the largest finite code); only NaN needs the explicit canonical 0x7f.
// The bit-level version below serves older GPUs; on the H200 the op suite checks the hardware path
// against fp8-core bit for bit. The bit version costs tens of dependent instructions per value,
// which made every quantisation kernel ALU-bound (370-1800 GB/s where a cast streams 4100).
__device__ __forceinline__ u8 encode_fp8_bits(float x, int fmt);
__device__ __forceinline__ u8 encode_fp8(float x, int fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (x != x) return 0x7f;
  unsigned short r;
  if (fmt) asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));
  else asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));
  return (u8)(r & 0xff);
#else
  return encode_fp8_bits(x, fmt);
#endif
}

__device__ __forceinline__ u8 encode_fp8_bits(float x, int fmt) {
  const u32 bits = __float_as_uint(x);
  const u32 sign = (bits >> 24) & 0x80u;
  const u32 abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7f;
  const int f32exp = (int)(abs >> 23);
  if (f32exp == 0) return (u8)sign;
  const int exp = f32exp - 127;
  const int man = fmt ? 2 : 3;
  const int bias = fmt ? 15 : 7;
  const u32 maxCode = fmt ? 0x7bu : 0x7eu;
  const int minExp = 1 - bias;
  u32 code, significand;
  int shift;
  if (exp >= minExp) {
    shift = 23 - man;
    significand = abs & 0x7fffffu;
    code = ((u32)(exp + bias) << man) | (significand >> shift);
  } else {
    shift = 23 - man + (minExp - exp);
    if (shift >= 25) return (u8)sign;
    significand = (abs & 0x7fffffu) | 0x800000u;
    code = significand >> shift;
  }
  const u32 rest = significand & ((1u << shift) - 1u);
  const u32 half = 1u << (shift - 1);
  if (rest > half || (rest == half && (code & 1u))) code += 1;
  if (code > maxCode) code = maxCode;
  return (u8)(code | sign);
}

// A code by the amax and unit scalings' one path: encode(f32(x * factor)); the unit factor is 1, and
// x * 1 is x (NaN stays NaN, which encodes as 0x7f either way). Power-of-two scales divide
// instead, and their producers take the two-pass path (the host's tilesAndColumns): an inlined
// IEEE division per code made these kernels take minutes to compile.
// E4M3 takes two values a conversion (cvt ...e4m3x2.f32) and fixes NaN codes afterwards for the
// whole word: satfinite never makes 0x7f or 0xff of a number (448 is 0x7e), so a byte whose low
// seven bits are all ones is a NaN, and clearing its sign gives the reference's 0x7f. (A NaN test
// and a select per value, four conversions and the packing made the quantisers ALU-bound.) E5M2,
// whose NaNs have several codes, keeps encode_fp8 per value.
__device__ __forceinline__ u32 quant_mul4(float a, float b, float c, float d, float fa, float fb, float fc,
                                          float fd, int fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (fmt == FMT_E4M3) {
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(__fmul_rn(b, fb)), "f"(__fmul_rn(a, fa)));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(__fmul_rn(d, fd)), "f"(__fmul_rn(c, fc)));
    const u32 w = (u32)lo | ((u32)hi << 16);
    const u32 nan = ((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;  // 0x80 in each NaN byte
    return w & ~nan;
  }
#endif
  return (u32)encode_fp8(__fmul_rn(a, fa), fmt) | ((u32)encode_fp8(__fmul_rn(b, fb), fmt) << 8) |
         ((u32)encode_fp8(__fmul_rn(c, fc), fmt) << 16) | ((u32)encode_fp8(__fmul_rn(d, fd), fmt) << 24);
}

// quant_mul4 for two values, one factor: the codes of a and b (low byte first).
__device__ __forceinline__ u32 quant_mul2(float a, float b, float f, int fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (fmt == FMT_E4M3) {
    unsigned short w;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(w) : "f"(__fmul_rn(b, f)), "f"(__fmul_rn(a, f)));
    const u32 nan = (((u32)w & 0x7f7fu) + 0x0101u) & 0x8080u;  // 0x80 in each NaN byte
    return (u32)w & ~nan;
  }
#endif
  return (u32)encode_fp8(__fmul_rn(a, f), fmt) | ((u32)encode_fp8(__fmul_rn(b, f), fmt) << 8);
}

// Exact decode of an FP8 code.
// Every FP8 value is exact in f16, so on sm_89+ the hardware widening (FP8 -> f16 -> f32) is exact.
__device__ __forceinline__ float decode_fp8_bits(u8 c, int fmt);
__device__ __forceinline__ float decode_fp8(u8 c, int fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  u32 h2;
  const unsigned short in = c;
  if (fmt) asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(h2) : "h"(in));
  else asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h2 & 0xffffu)));
  return f;
#else
  return decode_fp8_bits(c, fmt);
#endif
}

// Four codes (w's bytes, lowest first) decoded as decode_fp8 does, two per conversion on sm_89+.
__device__ __forceinline__ void decode_fp8x4(u32 w, int fmt, float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  u32 lo, hi;
  const unsigned short a = w & 0xffffu, b = w >> 16;
  if (fmt) {
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(lo) : "h"(a));
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(hi) : "h"(b));
  } else {
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"(a));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"(b));
  }
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[0]) : "h"((unsigned short)(lo & 0xffffu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[1]) : "h"((unsigned short)(lo >> 16)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[2]) : "h"((unsigned short)(hi & 0xffffu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[3]) : "h"((unsigned short)(hi >> 16)));
#else
  for (int j = 0; j < 4; j++) v[j] = decode_fp8_bits((w >> (8 * j)) & 0xff, fmt);
#endif
}

__device__ __forceinline__ float decode_fp8_bits(u8 c, int fmt) {
  const int man = fmt ? 2 : 3;
  const int bias = fmt ? 15 : 7;
  const int expMax = fmt ? 31 : 15;
  const int e = (c >> man) & expMax;
  const int m = c & ((1 << man) - 1);
  float v;
  if (fmt && e == expMax) v = m == 0 ? f32_inf() : f32_nan();
  else if (!fmt && e == expMax && m == (1 << man) - 1) v = f32_nan();
  else if (e == 0) v = (float)m * __uint_as_float((u32)(127 + 1 - bias - man) << 23);
  else v = __uint_as_float(((u32)(e - bias + 127) << 23) | ((u32)m << (23 - man)));
  return (c & 0x80) ? -v : v;
}

__device__ __forceinline__ float fp8_max(int fmt) { return fmt ? 57344.0f : 448.0f; }

// Smallest power of two >= q from q's bits (docs/numerics.md, pow2Scales); 2^-149 for q <= 0 or NaN.
__device__ __forceinline__ float pow2_ceil(float q) {
  if (!(q > 0.0f)) return __uint_as_float(1u);
  if (q == f32_inf()) return q;
  const u32 bits = __float_as_uint(q);
  const u32 exp = bits >> 23;
  const u32 man = bits & 0x7fffffu;
  if (exp == 0) {
    const int top = 31 - __clz(man);
    return man == (1u << top) ? q : __uint_as_float(1u << (top + 1));
  }
  return man == 0 ? q : __uint_as_float((exp + 1) << 23);
}

// Scale modes: SCALE_AMAX amax/FMAX, SCALE_POW2 a power of two, SCALE_UNIT scale 1.
// From a group's amax: the stored scale, and the value is encoded as encode(x * factor) (amax),
// encode(x / scale) (pow2) or encode(x) (unit).
struct QScale {
  float scale;
  float factor;
};

__device__ __forceinline__ QScale qscale(float amax, float eps, int fmt, int mode) {
  QScale s;
  if (mode == SCALE_UNIT) {
    s.scale = 1.0f;
    s.factor = 1.0f;
    return s;
  }
  const float a = amax > eps ? amax : eps;
  const float fmax = fp8_max(fmt);
  if (mode == SCALE_POW2) {
    s.scale = pow2_ceil(__fdiv_rn(a, fmax));
    s.factor = s.scale;
  } else {
    s.factor = __fdiv_rn(fmax, a);
    s.scale = __fdiv_rn(a, fmax);
  }
  return s;
}

__device__ __forceinline__ u8 quant_value(float x, QScale s, int fmt, int mode) {
  if (mode == SCALE_UNIT) return encode_fp8(x, fmt);
  if (mode == SCALE_POW2) return encode_fp8(__fdiv_rn(x, s.factor), fmt);
  return encode_fp8(__fmul_rn(x, s.factor), fmt);
}

// SwiGLU's sigmoid, and (dg, du) of h = silu(g) u for dh = d, in f32 (nn.cu's swiglu kernels and
// quant.cu's quantisers of the same gradient: one definition, the same bits).
__device__ __forceinline__ float sigmoid_f(float x) { return __fdiv_rn(1.0f, 1.0f + expf(-x)); }
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float* dg, float* du) {
  const float s = sigmoid_f(g);
  *du = d * g * s;
  *dg = d * u * s * (1.0f + g * (1.0f - s));
}

// RoPE on four adjacent columns c .. c + 3 of row r (c % 4 == 0; width, offset and dim multiples of
// 4, so the group holds two whole pairs or none): each pair (a, b) rotated by the angle of position
// r % seqLen in double, rounded once; cs: (cos, sin) per pair and position (nn.cu's rope_table; the
// inverse rotation negates the sines). nn.cu's rope_rows4 and quant.cu's quantisers of its output.
__device__ __forceinline__ float2 rotate_pair(double a, double b, double c, double s) {
  return make_float2((float)(a * c - b * s), (float)(a * s + b * c));
}
__device__ __forceinline__ float4 rope_group4(float4 v, const double* cs, int r, int c, int width, int offset,
                                              int dim, int seqLen, int inverse) {
  const int h = c / width, j = c - h * width - offset;
  if (j < 0 || j >= dim) return v;
  const double2* rc = (const double2*)(cs + (i64)(r % seqLen) * dim);
  const double2 p0 = rc[j >> 1], p1 = rc[(j >> 1) + 1];
  const double s0 = inverse ? -p0.y : p0.y, s1 = inverse ? -p1.y : p1.y;
  const float2 a = rotate_pair(v.x, v.y, p0.x, s0), b = rotate_pair(v.z, v.w, p1.x, s1);
  return make_float4(a.x, a.y, b.x, b.y);
}

// A running amax a (>= 0, never NaN: it starts at 0) with |x| taken in: NaN counts as 0 (ignored),
// as the reference's `v > amax` comparison does, because fmaxf returns its other operand when one
// is NaN. One FMNMX a value (a NaN test and a select besides made the quantisers ALU-bound).
__device__ __forceinline__ float amax_add(float a, float x) { return fmaxf(a, fabsf(x)); }
__device__ __forceinline__ float amax_add4(float a, float4 v) {
  return amax_add(amax_add(amax_add(amax_add(a, v.x), v.y), v.z), v.w);
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Whether a grid-stride loop over n elements can index with int (its last step stays below 2^31):
// element loops that divide their index take the 32-bit path then (a 64-bit division is a long
// instruction sequence, and made such kernels bound by integer arithmetic).
__device__ __forceinline__ bool fits_i32(i64 n) { return n + (i64)gridDim.x * blockDim.x < 2147483647LL; }

// Number of scales of a rows x cols matrix in a group layout (fp8-core scaleShape).
__device__ __forceinline__ int scale_count(int group, int rows, int cols) {
  switch (group) {
    case G_TILE: return rows * cdiv(cols, 128);
    case G_BLOCK: return cdiv(rows, 128) * cdiv(cols, 128);
    case G_COLTILE: return cdiv(rows, 128) * cols;
    case G_ROW: return rows;
    default: return 1;
  }
}

// Index of the scale of element (r, c) of a rows x cols matrix (fp8-core groupIndexer).
__device__ __forceinline__ int scale_index(int group, int r, int c, int rows, int cols) {
  switch (group) {
    case G_TILE: return r * cdiv(cols, 128) + c / 128;
    case G_BLOCK: return (r / 128) * cdiv(cols, 128) + c / 128;
    case G_COLTILE: return (r / 128) * cols + c;
    case G_ROW: return r;
    default: return 0;
  }
}

// Deterministic reductions: a fixed shuffle tree in each warp, then warp 0 over the warps' sums.
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double t = lane < nw ? part[lane] : 0.0;
  t = warp_sum(t);
  return t;
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partm[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) partm[warp] = v;
  __syncthreads();
  float t = lane < nw ? partm[lane] : 0.0f;
  return warp_max(t);
}

__device__ __forceinline__ float block_maxf_any(float v) {
  // Like block_max but for values that may be negative (e.g. logits).
  __shared__ float partn[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) partn[warp] = v;
  __syncthreads();
  float t = lane < nw ? partn[lane] : -f32_inf();
  return warp_max(t);
}
