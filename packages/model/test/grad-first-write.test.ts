// Param.gradZero and MatmulOptions.accumulateZero: each Linear's first Wgrad after zeroGrad() may
// write its product into the gradient instead of adding it (the cuda backend's sm90 Wgrad does, so
// that the step does not read the f32 gradient back). A backend that takes the hint literally,
// clearing the gradient before adding, must give the gradients of one that ignores it, bit for bit,
// through two micro-batches and the chunked loss (the head's Linear runs twice per micro-batch):
// a hint given while the gradient already held a contribution would drop it.
import { presetPolicy } from "@moe8/fp8-core";
import { type GroupedMatmulOptions, type MatmulOptions, type Tensor, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { DeepSeekModel, LOSS_CHUNK_ROWS } from "../src/model.ts";
import { batchOf, MICRO } from "./helpers.ts";

/** Writes, rather than adds, where the caller says the accumulate target holds zeros. */
class FirstWriteBackend extends TsBackend {
  hinted = 0;

  override matmul(a: Tensor, b: Tensor, o: MatmulOptions): Tensor {
    if (o.accumulate && o.accumulateZero) {
      this.hinted++;
      this.fill(o.accumulate, 0);
    }
    return super.matmul(a, b, o);
  }

  override groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, o: GroupedMatmulOptions): Tensor {
    if (o.accumulate && o.accumulateZero) {
      this.hinted++;
      this.fill(o.accumulate, 0);
    }
    return super.groupedMatmul(a, b, offsets, o);
  }
}

describe("the first Wgrad into a cleared gradient", () => {
  for (const preset of ["bf16", "fp8"] as const)
    it(`${preset}: writing it gives the gradients of adding it, over two micro-batches`, async () => {
      const run = async (b: TsBackend) => {
        const m = new DeepSeekModel(b, MICRO, presetPolicy(preset), 3);
        const first = batchOf(b, MICRO, 8, 520, 5);
        const second = batchOf(b, MICRO, 8, 520, 6);
        expect(8 * 520).toBeGreaterThan(LOSS_CHUNK_ROWS); // the head's Linear runs twice a batch
        m.zeroGrad();
        const cleared = m.params.filter((p) => p.gradZero).length;
        for (const batch of [first, second])
          await b.scope(async () => m.lossAndGrad(batch.ids, batch.targets, batch.shape, 0.5).ce.item());
        const grads = await Promise.all(m.params.map(async (p) => (await p.grad.read()) as Float32Array));
        return { m, cleared, grads, written: m.params.filter((p) => !p.gradZero).length };
      };
      const plain = await run(new TsBackend());
      const fw = new FirstWriteBackend();
      const hinted = await run(fw);
      expect(hinted.cleared).toBe(hinted.m.params.length); // zeroGrad clears every flag
      // One hint per Linear weight (its first Wgrad), none for the others (embedding, norms, router).
      expect(fw.hinted).toBe(hinted.written);
      expect(fw.hinted).toBeGreaterThan(0);
      for (let i = 0; i < plain.grads.length; i++)
        expect(hinted.grads[i], plain.m.params[i].name).toEqual(plain.grads[i]);
    });
});
