"""Convert the embedded SmolLM2 GGUF into a Hugging Face model dir (float32 safetensors + tokenizer), for the
engines and trainers that load that form (vLLM's CPU build, TRL). Runs in a venv with transformers, torch, gguf.
    python scripts/gguf-to-hf.py MODEL.gguf OUT_DIR
"""

import os
import shutil
import sys

gguf, out = sys.argv[1], sys.argv[2]
if os.path.isfile(os.path.join(out, "config.json")):
    sys.exit(0)  # converted before

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402  (slow: only when there is work)

print(f"converting {gguf} to Hugging Face safetensors in {out}", file=sys.stderr)
tmp = out + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
d, f = os.path.dirname(gguf), os.path.basename(gguf)
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")  # dequantized on load
# transformers refuses to save a model it loaded from GGUF: copy the weights into a plain one of the same config.
config = loaded.config
config.quantization_config = None
del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype="float32")
model.load_state_dict(loaded.state_dict())
model.save_pretrained(tmp)
os.rename(tmp, out)  # whole or not at all: a conversion cut short is done again
