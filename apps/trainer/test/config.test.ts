// Config resolution: DEFAULTS <- preset or file <- flags, with a preset model's own step shape.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { STEP_SHAPES } from "@moe8/model";
import { tempDir } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { parseArgs } from "../src/args.ts";
import { resolveModel } from "../src/run/config.ts";
import { configFromArgs, TRAIN_FLAGS } from "../src/run/flags.ts";

const resolve = (argv: string[]) => configFromArgs(parseArgs(argv, TRAIN_FLAGS, ["precision."]));

describe("parseArgs", () => {
  it("an optional integer: alone true, with a value (or =value) that integer, before another flag alone", () => {
    const f = (argv: string[]) => parseArgs(argv, TRAIN_FLAGS, ["precision."]).flags["expert-parallel"];
    expect(f(["--expert-parallel"])).toBe(true);
    expect(f(["--expert-parallel", "2"])).toBe(2);
    expect(f(["--expert-parallel=4"])).toBe(4);
    expect(f(["--expert-parallel", "--ranks", "4"])).toBe(true);
    expect(f(["--ranks", "4"])).toBeUndefined();
    expect(() => f(["--expert-parallel", "1.5"])).toThrow('flag --expert-parallel: "1.5" is not an integer');
    expect(() => f(["--expert-parallel="])).toThrow('flag --expert-parallel: "" is not an integer');
  });
});

describe("configFromArgs", () => {
  it("uses tiny and its step shape by default", () => {
    const c = resolve([]);
    expect([c.model, c.batchSize, c.seqLen]).toEqual([
      "tiny",
      STEP_SHAPES.tiny.batch,
      STEP_SHAPES.tiny.seqLen,
    ]);
  });

  it("gives --config small the small step shape (8 x 2048), flags still win", () => {
    const c = resolve(["--config", "small"]);
    expect([c.model, c.batchSize, c.seqLen]).toEqual(["small", 8, 2048]);
    const d = resolve(["--config", "small", "--batch-size", "2", "--seq-len", "256"]);
    expect([d.batchSize, d.seqLen]).toEqual([2, 256]);
  });

  it("gives a config file naming a preset model that model's step shape unless it sets one", () => {
    const dir = tempDir("config");
    const a = join(dir, "a.json");
    writeFileSync(a, JSON.stringify({ model: "small", steps: 5 }));
    const c = resolve(["--config", a]);
    expect([c.model, c.steps, c.batchSize, c.seqLen]).toEqual(["small", 5, 8, 2048]);
    const b = join(dir, "b.json");
    writeFileSync(b, JSON.stringify({ model: "small", batchSize: 4 }));
    expect(resolve(["--config", b]).batchSize).toBe(4);
  });

  it("--model.* change a preset's fields and keep its step shape; a file's fields stay under them", () => {
    const c = resolve(["--config", "small", "--model.num_hidden_layers", "2", "--model.rope_theta", "5e5"]);
    expect([c.model, c.batchSize, c.seqLen]).toEqual([
      { base: "small", num_hidden_layers: 2, rope_theta: 5e5 },
      8,
      2048,
    ]);
    expect(resolveModel(c).hidden_size).toBe(1024);
    const dir = tempDir("config");
    const file = join(dir, "m.json");
    writeFileSync(file, JSON.stringify({ model: { base: "tiny", hidden_size: 64, num_hidden_layers: 6 } }));
    const d = resolve(["--config", file, "--model.num_hidden_layers", "3"]);
    expect(d.model).toEqual({ base: "tiny", hidden_size: 64, num_hidden_layers: 3 });
    expect(() => resolve(["--model.kv_lora_rank", "0"])).toThrow(/^--model\.kv_lora_rank 0: Too small/);
  });

  it("--balance.* set the model's balancing for this run, over a config file's, and keep a preset's step shape", () => {
    const dir = tempDir("config");
    const file = join(dir, "balance.json");
    writeFileSync(file, JSON.stringify({ model: "small", balance: { gamma: 0.02, alpha: 0.5 } }));
    const c = resolve(["--config", file, "--balance.rule", "sign", "--balance.alpha", "0.01"]);
    expect([c.model, c.batchSize, c.seqLen]).toEqual(["small", 8, 2048]);
    const m = resolveModel(c);
    expect([m.bias_update_speed, m.bias_update_rule, m.seq_aux_alpha]).toEqual([0.02, "sign", 0.01]);
    expect(() => resolve(["--balance.rule", "fast"])).toThrow(/^--balance\.rule fast: /);
    expect(() => resolve(["--balance.gamma", "2"])).toThrow(/^--balance\.gamma 2: /);
    // The routers' learning-rate scale is the optimiser's, not the model's.
    expect(resolve(["--balance.router-lr", "0.5"]).balance.routerLr).toBe(0.5);
    expect(resolve([]).balance.routerLr).toBeUndefined();
    expect(() => resolve(["--balance.router-lr", "-1"])).toThrow(/^--balance\.router-lr -1: /);
  });
});
