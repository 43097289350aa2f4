// One epoch's document order. Shuffling every document globally would need random access to single
// documents, which an Arrow stream does not give; the unit of random access is a record batch. So an
// epoch shuffles the record batches, cuts the shuffled list into groups of about `shuffleTokens`
// tokens, and shuffles the documents inside each group. A group is what the loader holds in memory;
// a dataset smaller than one group (the bundled corpus) gets a full document shuffle.
import { Rng } from "./prng.ts";

/** The training documents by record batch, fixed for a dataset and split. */
export interface BlockDocs {
  /** Record batches that hold training documents. */
  blocks: Int32Array;
  /** Training documents of blocks[i] are docs[starts[i]..starts[i+1]). */
  starts: Int32Array;
  docs: Int32Array;
  tokens: Int32Array;
}

export interface EpochPlan {
  /** Training document indices in this epoch's order. */
  order: Int32Array;
  /** order[groupEnds[g-1]..groupEnds[g]) is group g. */
  groupEnds: number[];
  /** Generator state after planning: the next epoch starts from it. */
  nextState: number[];
}

export function groupTrainDocs(train: Int32Array, docBlock: Int32Array, docLengths: Int32Array): BlockDocs {
  const blocks: number[] = [];
  const starts: number[] = [];
  train.forEach((d, i) => {
    if (i === 0 || docBlock[d] !== docBlock[train[i - 1]]) {
      blocks.push(docBlock[d]);
      starts.push(i);
    }
  });
  starts.push(train.length);
  const tokens = Int32Array.from(blocks, (_, i) => {
    let n = 0;
    for (let j = starts[i]; j < starts[i + 1]; j++) n += docLengths[train[j]];
    return n;
  });
  return { blocks: Int32Array.from(blocks), starts: Int32Array.from(starts), docs: train, tokens };
}

export function planEpoch(bd: BlockDocs, state: readonly number[], shuffleTokens: number): EpochPlan {
  const rng = new Rng(state);
  const blockOrder = rng.shuffle(Int32Array.from({ length: bd.blocks.length }, (_, i) => i));
  const order = new Int32Array(bd.docs.length);
  const groupEnds: number[] = [];
  let pos = 0;
  let groupStart = 0;
  let groupTokens = 0;
  for (let k = 0; k < blockOrder.length; k++) {
    const b = blockOrder[k];
    order.set(bd.docs.subarray(bd.starts[b], bd.starts[b + 1]), pos);
    pos += bd.starts[b + 1] - bd.starts[b];
    groupTokens += bd.tokens[b];
    if (groupTokens >= shuffleTokens || k === blockOrder.length - 1) {
      rng.shuffle(order.subarray(groupStart, pos));
      groupEnds.push(pos);
      groupStart = pos;
      groupTokens = 0;
    }
  }
  return { order, groupEnds, nextState: rng.state() };
}
