// One status line per logged step: step, loss, learning rate, grad norm, tokens/s, expert balance
// (the worst MoE layer's load max/mean and the experts that got no token), under expert parallelism
// the time of the step's token exchanges, ETA.

export function formatDuration(s: number): string {
  if (!Number.isFinite(s)) return "?";
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = Math.floor(s % 60);
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

export function progressLine(p: {
  step: number;
  total: number;
  loss: number;
  /** Multi-token prediction: the MTP module's loss (token i + 2). */
  mtpLoss?: number;
  lr: number;
  gradNorm: number;
  tokensPerS: number;
  balance?: number;
  idleExperts?: number;
  /** Expert parallelism: the step's token exchanges, milliseconds. */
  exchangeMs?: number;
  etaS: number;
  valLoss?: number;
  /** The validation batches' worst load max/mean (routing without the router noise). */
  valBalance?: number;
}): string {
  const w = String(p.total).length;
  return [
    `step ${String(p.step).padStart(w)}/${p.total}`,
    `loss ${p.loss.toFixed(4)}`,
    p.mtpLoss !== undefined ? `mtp ${p.mtpLoss.toFixed(4)}` : null,
    p.valLoss !== undefined
      ? `val ${p.valLoss.toFixed(4)}${p.valBalance !== undefined ? ` (load max/mean ${p.valBalance.toFixed(2)})` : ""}`
      : null,
    `lr ${p.lr.toExponential(2)}`,
    `gnorm ${p.gradNorm.toFixed(3)}`,
    `${Math.round(p.tokensPerS)} tok/s`,
    p.balance !== undefined
      ? `load max/mean ${p.balance.toFixed(2)}${p.idleExperts !== undefined ? `, ${p.idleExperts} idle experts` : ""}`
      : null,
    p.exchangeMs !== undefined ? `exchange ${p.exchangeMs.toFixed(1)} ms` : null,
    `eta ${formatDuration(p.etaS)}`,
  ]
    .filter(Boolean)
    .join(" | ");
}
