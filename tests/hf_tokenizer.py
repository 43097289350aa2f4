"""Loads a model folder's tokenizer with transformers' AutoTokenizer, as a user of the folder would,
and prints, for each text of a JSON list read from stdin, its ids and their decoding (a JSON list on
stdout). Run by tests/hf-export.test.ts, which compares them with moe8's own tokenizer."""
import json
import sys

from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for text in json.load(sys.stdin):
    ids = tok.encode(text, add_special_tokens=True)
    out.append({"ids": ids, "decoded": tok.decode(ids)})
json.dump(out, sys.stdout)
