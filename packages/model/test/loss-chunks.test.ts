// The loss computes the logits LOSS_CHUNK_ROWS rows at a time (only one chunk's [rows, vocab] logits
// and gradient live at once). The chunked loss and gradients must equal the whole-batch ones.
import { presetPolicy } from "@moe8/fp8-core";
import { TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { DeepSeekModel, LOSS_CHUNK_ROWS } from "../src/model.ts";
import { batchOf, MICRO } from "./helpers.ts";

function relErr(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return den === 0 ? num : num / den;
}

describe("chunked loss", () => {
  for (const preset of ["bf16", "fp8"] as const)
    it(`${preset}: loss and gradients over two chunks equal the whole batch's`, async () => {
      const b = new TsBackend();
      const m = new DeepSeekModel(b, MICRO, presetPolicy(preset), 3);
      const batch = batchOf(b, MICRO, 8, 520, 5);
      expect(8 * 520).toBeGreaterThan(LOSS_CHUNK_ROWS); // two chunks: 4096 and 64 rows
      const grads = async () => Promise.all(m.params.map(async (p) => (await p.grad.read()) as Float32Array));
      const before = b.stats().tensors;

      m.zeroGrad();
      const chunked = await b.scope(async () =>
        m.lossAndGrad(batch.ids, batch.targets, batch.shape).ce.item(),
      );
      const g1 = await grads();
      expect(b.stats().tensors).toBe(before); // nothing a chunk made outlives the step's arena

      m.zeroGrad();
      const whole = await b.scope(async () => {
        const logits = m.forward(batch.ids, batch.shape);
        const { loss, dlogits } = b.crossEntropy(logits, batch.targets, 1);
        m.backward(dlogits);
        return loss.item();
      });
      const g2 = await grads();

      expect(Math.abs(chunked - whole) / whole).toBeLessThan(1e-6);
      for (let i = 0; i < g1.length; i++) expect(relErr(g1[i], g2[i]), m.params[i].name).toBeLessThan(1e-5);
    });
});
