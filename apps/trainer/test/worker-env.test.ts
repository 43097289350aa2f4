// What a worker rank is started with (dist/ranks.ts workerEnv): the rendezvous, its GPU under
// --gpus, and NVLink multicast off for NCCL even when the user's environment turns it on.
import { describe, expect, it } from "vitest";
import { workerEnv } from "../src/dist/ranks.ts";

describe("workerEnv", () => {
  const base = { PATH: "/usr/bin", NCCL_NVLS_ENABLE: "1", MOE8_CUDA_DEVICE: "2" };

  it("turns NVLink multicast off over the caller's setting, and keeps the rest of the environment", () => {
    const env = workerEnv(base, 1, 2, { port: 4242, config: "/tmp/c.json" }, null);
    expect(env.NCCL_NVLS_ENABLE).toBe("0");
    expect(env.PATH).toBe("/usr/bin");
    expect([env.MOE8_RANK, env.MOE8_RANKS, env.MOE8_RANKS_PORT, env.MOE8_RANKS_CONFIG]).toEqual([
      "1",
      "2",
      "4242",
      "/tmp/c.json",
    ]);
    // Without --gpus the rank keeps the caller's device setting and does not take NCCL.
    expect(env.MOE8_CUDA_DEVICE).toBe("2");
    expect(env.MOE8_RANKS_NCCL).toBeUndefined();
  });

  it("under --gpus, puts rank r on the r-th GPU after the leader's and over NCCL", () => {
    for (const r of [1, 3]) {
      const env = workerEnv(base, r, 4, { port: 1, config: "c" }, { device: 2 });
      expect(env.MOE8_CUDA_DEVICE).toBe(String(2 + r));
      expect(env.MOE8_RANKS_NCCL).toBe("1");
      expect(env.NCCL_NVLS_ENABLE).toBe("0");
    }
  });
});
