// The same model step on every backend present agrees with the ts reference within the precision's
// tolerance: loss and every parameter gradient, under the fp32, bf16 and fp8 presets.
import { presetPolicy } from "@moe8/fp8-core";
import { availableBackends, createBackend } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, type ModelConfig } from "@moe8/model";
import { type Backend, Rng, relErr, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";

const CFG: ModelConfig = {
  ...CONFIGS.tiny,
  vocab_size: 64,
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  kv_lora_rank: 32,
  intermediate_size: 128,
  moe_intermediate_size: 64,
  initializer_range: 0.05,
  embedding_init_std: 0.05,
};

async function step(b: Backend, preset: string) {
  const m = new DeepSeekModel(b, CFG, presetPolicy(preset), 3);
  const rng = new Rng(5);
  const T = 40;
  const B = 2;
  const ids = rng.ints(B * T, CFG.vocab_size);
  const tg = rng.ints(B * T, CFG.vocab_size);
  const loss = await b.scope(async () => {
    const r = m.lossAndGrad(b.upload(ids, [B * T], "i32"), b.upload(tg, [B * T], "i32"), {
      batch: B,
      seq: T,
    });
    return r.total.item();
  });
  const grads = new Map<string, Float32Array>();
  for (const p of m.params) grads.set(p.name, (await p.grad.read()) as Float32Array);
  m.dispose();
  return { loss, grads };
}

const others = availableBackends().filter((n) => n !== "ts");
// Gradient tolerance per preset: f32 sums in a different order; bf16/fp8 roundings can flip by an ulp
// at different places, and a top-k choice near a tie may differ, so the bound is looser.
const TOL: Record<string, { loss: number; grad: number }> = {
  fp32: { loss: 1e-5, grad: 1e-5 },
  bf16: { loss: 1e-3, grad: 5e-2 },
  fp8: { loss: 1e-3, grad: 5e-2 },
};

describe.each(others)("backend %s agrees with ts on a model step", (name) => {
  for (const preset of ["fp32", "bf16", "fp8"])
    it(preset, async () => {
      const want = await step(new TsBackend(), preset);
      const got = await step(createBackend(name as "cpu"), preset);
      expect(Math.abs(got.loss - want.loss) / want.loss).toBeLessThan(TOL[preset].loss);
      let worst = ["", 0] as [string, number];
      for (const [n, g] of want.grads) {
        const e = relErr(got.grads.get(n)!, g, 1e-8);
        if (e > worst[1]) worst = [n, e];
      }
      console.log(
        `${name} ${preset}: loss ${got.loss} vs ${want.loss}, worst gradient ${worst[0]} rel err ${worst[1].toExponential(2)}`,
      );
      expect(worst[1], `worst gradient ${worst[0]}`).toBeLessThan(TOL[preset].grad);
    });
});

it("a native backend is present where cargo is (CI builds it)", () => {
  if (process.env.CI === "true") expect(others).toContain("cpu");
});
