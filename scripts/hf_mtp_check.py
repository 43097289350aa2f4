"""A moe8 checkpoint with multi-token prediction, scored by Hugging Face transformers: the main
model's mean cross-entropy (DeepseekV3ForCausalLM, as scripts/hf_check.py) and the MTP module's,
computed here with transformers' own decoder layer for the MTP block (the checkpoint loaded a second
time with one layer more, so that transformers reads `model.layers.{L}.*`, L = num_hidden_layers,
into its layer L) and DeepseekV3RMSNorm for its norms, as DeepSeek-V3's inference code
runs the module: x = eh_proj([enorm(embed(t_{i+1})) | hnorm(h_i)]), h_i the last layer's output
before the final norm, then the layer, shared_head.norm and the shared lm_head against t_{i+2},
over every position but each window's last. Prints JSON {loss, mtp_loss, tokens, mtp_tokens}.
Usage: python3 scripts/hf_mtp_check.py CHECKPOINT_DIR WINDOWS.bin SEQ_LEN"""
import json
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

ckpt, path, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.from_numpy(np.fromfile(path, dtype="<i4").astype(np.int64)).view(-1, seq + 1)
model = DeepseekV3ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
cfg = model.config
L = cfg.num_hidden_layers
prefix = f"model.layers.{L}."
weights = {k[len(prefix):]: v.float() for k, v in load_file(f"{ckpt}/model.safetensors").items() if k.startswith(prefix)}
if not weights:
    sys.exit(f"{ckpt}: no tensor named {prefix}*: the checkpoint has no MTP module")

deeper = DeepseekV3ForCausalLM.from_pretrained(
    ckpt, torch_dtype=torch.float32, attn_implementation="eager", num_hidden_layers=L + 1
).eval()
layer = deeper.model.layers[L]
norm = lambda name: (lambda n: (n.weight.data.copy_(weights[f"{name}.weight"]), n)[1])(DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps))
enorm, hnorm, head_norm = norm("enorm"), norm("hnorm"), norm("shared_head.norm")
eh_proj = weights["eh_proj.weight"]

captured = {}
model.model.layers[L - 1].register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
x_ids, t1, t2 = ids[:, :-1], ids[:, 1:], ids[:, 2:]
with torch.no_grad():
    logits = model(input_ids=x_ids).logits.float()
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), t1.reshape(-1))
    h = captured["h"]
    e = model.model.embed_tokens(t1)
    x = torch.cat([enorm(e), hnorm(h)], dim=-1) @ eh_proj.T
    pos = torch.arange(seq).unsqueeze(0).expand(ids.shape[0], -1)
    cos_sin = model.model.rotary_emb(x, pos)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    h2 = out[0] if isinstance(out, tuple) else out
    mtp_logits = model.lm_head(head_norm(h2))[:, :-1].float()
    mtp_loss = torch.nn.functional.cross_entropy(mtp_logits.reshape(-1, V), t2.reshape(-1))
print(json.dumps({
    "loss": loss.item(), "mtp_loss": mtp_loss.item(), "tokens": int(t1.numel()), "mtp_tokens": int(t2.numel()),
    "transformers": __import__("transformers").__version__,
}))
