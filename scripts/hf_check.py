"""Loads a moe8 checkpoint with Hugging Face transformers (DeepseekV3ForCausalLM) and prints the mean
token cross-entropy over windows written by scripts/dump-windows.ts, as JSON {loss, tokens}.
Usage: python3 scripts/hf_check.py CHECKPOINT_DIR WINDOWS.bin SEQ_LEN"""
import json, sys
import numpy as np
import torch
from transformers import DeepseekV3ForCausalLM

ckpt, path, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.from_numpy(np.fromfile(path, dtype="<i4").astype(np.int64)).view(-1, seq + 1)
model = DeepseekV3ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=ids[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
print(json.dumps({"loss": loss.item(), "tokens": int(ids[:, 1:].numel()), "transformers": __import__("transformers").__version__}))
