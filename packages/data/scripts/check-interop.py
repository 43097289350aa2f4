"""Interoperability check with the Python ecosystem (not run in CI; needs `pip install tokenizers pyarrow`).

Called by check-interop.ts with a work folder holding tokenizer.json and samples.json (texts and the
ids our BpeTokenizer gave them). Checks that Hugging Face `tokenizers` loads our tokenizer.json and
encodes/decodes exactly as we do, that pyarrow reads our shards, and writes hf.arrows (an input_ids
List<int64> stream, as `datasets` writes) for the TypeScript side to read back.
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

work, dataset = Path(sys.argv[1]), Path(sys.argv[2])
tok = Tokenizer.from_file(str(work / "tokenizer.json"))
samples = json.loads((work / "samples.json").read_text())
for text, ids in zip(samples["texts"], samples["ids"]):
    got = tok.encode(text).ids
    assert got == ids, f"encode differs for {text[:40]!r}: {got[:10]} vs {ids[:10]}"
    assert tok.decode(ids, skip_special_tokens=False) == text, f"decode differs for {text[:40]!r}"
print(f"tokenizers {tok.get_vocab_size()} tokens: {len(samples['texts'])} samples encode and decode identically")

manifest = json.loads((dataset / "manifest.json").read_text())
tokens = 0
for shard in manifest["shards"]:
    with pa.ipc.open_stream(dataset / shard["file"]) as reader:
        assert str(reader.schema.field("tokens").type) == "list<item: int32>", reader.schema
        tokens += sum(pc.sum(pc.list_value_length(b.column(0))).as_py() or 0 for b in reader)
assert tokens == manifest["tokens"], (tokens, manifest["tokens"])
print(f"pyarrow reads {len(manifest['shards'])} shards, {tokens} tokens, as the manifest says")

docs = [[i * 10 + j for j in range(i % 7 + 1)] for i in range(100)]
schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("attention_mask", pa.list_(pa.int8()))])
with pa.ipc.new_stream(work / "hf.arrows", schema) as writer:
    for start in range(0, 100, 30):
        part = docs[start : start + 30]
        columns = [pa.array(part, pa.list_(pa.int64())), pa.array([[1] * len(d) for d in part], pa.list_(pa.int8()))]
        writer.write_batch(pa.record_batch(columns, schema=schema))
(work / "hf.json").write_text(json.dumps(docs))
print("wrote hf.arrows (input_ids: list<int64>)")
