"""Generates text from a moe8 checkpoint or `moe8 export` folder with transformers alone: the folder's
tokenizer (AutoTokenizer), model (AutoModelForCausalLM, DeepseekV3ForCausalLM) and
generation_config.json. Needs torch and transformers. Prints the prompt and its continuation.

  python3 scripts/hf_generate.py FOLDER [--prompt TEXT] [--tokens N] [--greedy] [--device cuda]
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--prompt", default="ROMEO:")
p.add_argument("--tokens", type=int, default=100)
p.add_argument("--greedy", action="store_true", help="greedy decoding instead of generation_config.json's sampling")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()

tok = AutoTokenizer.from_pretrained(a.folder)
model = AutoModelForCausalLM.from_pretrained(a.folder, torch_dtype="auto").to(a.device).eval()
ids = tok(a.prompt, return_tensors="pt").input_ids.to(a.device)
# max_length in generation_config.json is the context the model was trained on: stay within it.
room = model.generation_config.max_length - ids.shape[1]
extra = {"do_sample": False} if a.greedy else {}
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=min(a.tokens, room), **extra)
print(tok.decode(out[0]))
