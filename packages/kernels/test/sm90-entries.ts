// Which wgmma entries a MOE8_SM90_FPROP value selects (the 6-stage BF16 entry's suffix, the 5-stage
// f32 entry's: the same), for the tests that check the kernels launched: "early" unless "plain".
export function fpropSuffix(value: string | undefined): string {
  return value === "plain" ? "" : "_early";
}
