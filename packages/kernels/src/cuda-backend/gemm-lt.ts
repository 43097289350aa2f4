// The GEMMs cuBLASLt computes (the addon's cudaGemmLt): f32, BF16, and the FP8 forms it supports
// with the recipe's scalings. A configuration cuBLASLt refuses is remembered and takes the tiled
// kernels of gemm.ts from then on.
import type { MatmulOptions, QuantInfo } from "@moe8/tensor";
import { Tensor } from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { type CudaContext, KERNELS } from "./context.ts";
import { transposeCodes } from "./quant.ts";

/**
 * The cuBLASLt FP8 GEMM an operand pair makes, or null (the tiled kernel): Fprop = 1x128 tiles x
 * 128x128 blocks as [M,K] x [N,K]; Dgrad = the same scalings as [M,K] x [K,N]; Wgrad = 128x1 column
 * tiles along the tokens as [K,M] x [K,N] (whole matrices, not expert segments); tensor-wise.
 */
function ltFp8Form(qa: QuantInfo, qb: QuantInfo, transA: boolean, transB: boolean) {
  const whole = !qa.segments && !qb.segments;
  if (!transA && transB && qa.group === "tile" && qb.group === "block") return "fprop";
  if (!transA && transB && qa.group === "tensor" && qb.group === "tensor") return "tensor";
  if (!transA && !transB && qa.group === "tile" && qb.group === "block") return "dgrad";
  if (transA && !transB && qa.group === "column-tile" && qb.group === "column-tile" && whole) return "wgrad";
  return null;
}

/** Output rounding and accumulation after a cuBLASLt product written to `c`. */
function finishLt(cx: CudaContext, c: DeviceBuffer | Tensor, o: MatmulOptions, n: number): void {
  if (o.accumulate) {
    const cp = c instanceof Tensor ? cx.p(c) : c.ptr;
    cx.launch(KERNELS.elementwise.acc_add_f32, cx.g1(n), 256, {
      acc: cx.p(o.accumulate),
      c: cp,
      roundBf16: o.outBf16 ? 1 : 0,
      n,
    });
  } else if (o.outBf16) {
    const cp = cx.p(c as Tensor);
    cx.launch(KERNELS.elementwise.round_bf16_f32, cx.g1(n), 256, { x: cp, out: cp, n });
  }
}

/** Tries cuBLASLt; false when it has no kernel for the case (then remembered). */
function tryLt(
  cx: CudaContext,
  key: string,
  call: (c: number, accumulate: boolean) => void,
  out: Tensor,
  o: MatmulOptions,
  M: number,
  N: number,
): boolean {
  if (!cx.useLt || cx.ltRefused.has(key)) return false;
  // Accumulate with BF16 rounding of the product: the product goes to scratch first. Into a target
  // that holds zeros (accumulateZero) cuBLASLt writes the product (beta 0) rather than adding it.
  const direct = !(o.accumulate && o.outBf16);
  const tmp = direct ? null : cx.scratch(M * N * 4);
  try {
    call(direct ? cx.p(out) : tmp!.ptr, direct && !!o.accumulate && !o.accumulateZero);
  } catch (e) {
    tmp?.free();
    const msg = e instanceof Error ? e.message : String(e);
    if (/NOT_SUPPORTED|INVALID_VALUE|no algorithm/.test(msg)) {
      cx.ltRefused.add(key);
      return false;
    }
    throw e;
  }
  if (tmp) {
    finishLt(cx, tmp, o, M * N);
    tmp.free();
  } else if (o.outBf16 && out.dtype !== "bf16") {
    finishLt(cx, out, o, M * N);
  }
  return true;
}

/** The cuBLASLt cases: f32, BF16 and FP8 Fprop (1x128 tiles x 128x128 blocks, or tensor-wise). */
export function matmulLt(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  out: Tensor,
  M: number,
  N: number,
  K: number,
  o: MatmulOptions,
): boolean {
  const transA = !!o.transA;
  const transB = !!o.transB;
  if (o.precision === "f32" || o.precision === "bf16") {
    // A bf16 output (matmul's storeBf16): cuBLASLt's epilogue rounds the f32 product to BF16.
    const ct = out.dtype === "bf16" ? "bf16" : "f32";
    const key = `${o.precision},${M},${N},${K},${transA},${transB},${ct}`;
    if (!cx.useLt || cx.ltRefused.has(key)) return false;
    let A = a;
    let B = b;
    const tmps: Tensor[] = [];
    if (o.precision === "bf16") {
      // cuBLASLt reads BF16: bf16 tensors as they are, f32 ones through a rounded copy.
      [A, B] = [a, b].map((t) => (t.dtype === "bf16" ? t : cx.backend.cast(t, "bf16")));
      tmps.push(...[A, B].filter((t) => t !== a && t !== b));
    }
    const t = o.precision === "bf16" ? "bf16" : "f32";
    const ok = tryLt(
      cx,
      key,
      (c, acc) =>
        cx.n.cudaGemmLt(cx.p(A), t, transA, 0, "none", cx.p(B), t, transB, 0, "none", c, ct, M, N, K, acc),
      out,
      o,
      M,
      N,
    );
    for (const x of tmps) cx.release(x);
    return ok;
  }
  if (!cx.useLtFp8 || (o.promotion ?? 128) !== 128 || out.dtype !== "f32") return false;
  const qa = a.quant!;
  const qb = b.quant!;
  if (qa.format === "e5m2" && qb.format === "e5m2") return false;
  if (K % 128 !== 0 || M % 16 !== 0 || N % 16 !== 0) return false;
  const form = ltFp8Form(qa, qb, transA, transB);
  if (!form || (form !== "tensor" && !cx.useLtFp8Block)) return false;
  const key = `fp8,${form},${qa.format},${qb.format},${M},${N},${K}`;
  if (cx.ltRefused.has(key)) return false;
  // cuBLASLt takes FP8 only as TN: A [M,K] and B [N,K], both K-contiguous. Other layouts are
  // transposed into scratch first (exact: codes and scales move together).
  const tmps: DeviceBuffer[] = [];
  const scratch = (bytes: number) => {
    const t = cx.scratch(bytes);
    tmps.push(t);
    return t.ptr;
  };
  // Column tiles along the tokens (Wgrad): codes [K, M] and [K, N] wanted as [M, K] and [N, K];
  // stored K-major (CudaContext.kMajor: [cols, pitch], pitch = K as K % 128 == 0) they are already,
  // else transposed. Their scales [K/128][M] and [K/128][N] are the layout cuBLASLt reads for VEC128.
  const tokensAsK = (t: Tensor, cols: number) =>
    cx.kMajor.has(t) ? cx.kMajorBuf(t).ptr : transposeCodes(cx, cx.p(t), K, cols, scratch(cols * K));
  const aPtr = form === "wgrad" ? tokensAsK(a, M) : cx.p(a);
  let bPtr = form === "wgrad" ? tokensAsK(b, N) : cx.p(b);
  let aScale = cx.p(qa.scales);
  let bScale = cx.p(qb.scales);
  if (form === "dgrad") bPtr = transposeCodes(cx, bPtr, K, N, scratch(K * N));
  if (form === "fprop" || form === "dgrad") {
    // cuBLASLt reads 128x128 weight scales [N/128][K/128] with each row padded to a multiple of 4
    // (unpadded, every block row after the first read the wrong scales on the H200).
    const nb = Math.ceil(N / 128);
    const kb = K / 128;
    if (form === "dgrad") {
      // Ours are [K/128][N/128] (the weight is stored [K, N]): transpose them first.
      const src = bScale;
      const dst = scratch(nb * kb * 4);
      cx.launch(KERNELS.elementwise.transpose_f32, cx.g1(nb * kb), 256, { x: src, out: dst, R: kb, C: nb });
      bScale = dst;
    }
    const ld = Math.ceil(kb / 4) * 4;
    if (ld !== kb) {
      const src = bScale;
      const dst = scratch(nb * ld * 4);
      cx.launch(KERNELS.elementwise.pad_rows_f32, cx.g1(nb * ld), 256, {
        x: src,
        out: dst,
        R: nb,
        C: kb,
        ld,
      });
      bScale = dst;
    }
    // cuBLASLt reads 1x128 activation scales as [K/128][M] (M contiguous): transpose ours.
    const src = aScale;
    const dst = scratch(M * kb * 4);
    cx.launch(KERNELS.elementwise.transpose_f32, cx.g1(M * kb), 256, { x: src, out: dst, R: M, C: kb });
    aScale = dst;
  }
  const mode = form === "tensor" ? ["scalar", "scalar"] : ["vec128", form === "wgrad" ? "vec128" : "blk128"];
  const ok = tryLt(
    cx,
    key,
    (c, acc) =>
      cx.n.cudaGemmLt(
        aPtr,
        qa.format,
        false,
        aScale,
        mode[0],
        bPtr,
        qb.format,
        true,
        bScale,
        mode[1],
        c,
        "f32",
        M,
        N,
        K,
        acc,
      ),
    out,
    o,
    M,
    N,
  );
  for (const t of tmps) t.free();
  return ok;
}
