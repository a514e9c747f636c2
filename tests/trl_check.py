"""Train on the job's outputs as a user would, with TRL (run by tests/test_trl.py inside the TRL venv that
scripts/install-trl-cpu.sh makes; sdg-job is not installed there). Prints one JSON object of what it found.

    python tests/trl_check.py MODEL_DIR SFT.jsonl DPO.jsonl TOOLS.jsonl

The calls are the README's ("Training on the output"), with a few steps and float32: TRL's default bf16 is
emulated on CPUs without AVX-512 and ran ~15x slower here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import trl
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

model, sft_file, dpo_file, tools_file = sys.argv[1:5]
# SmolLM2's own template renders no tools: Qwen2.5's, as TRL ships it, does.
TOOL_TEMPLATE = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
STEPS = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-5, use_cpu=True, bf16=False,
             report_to="none", save_strategy="no", logging_steps=1, seed=0)  # fmt: skip


def tokenizer(template: str | None = None):
    t = AutoTokenizer.from_pretrained(model)
    if template:
        t.chat_template = template
    return t


def loss(trainer) -> float:
    return trainer.train().training_loss


found: dict = {}

sft = load_dataset("json", data_files=sft_file, split="train")
found["sft_record_tokens"] = [len(tokenizer().apply_chat_template(r["messages"], return_dict=True)["input_ids"])
                              for r in sft]  # fmt: skip
found["sft_loss"] = loss(SFTTrainer(model=model, args=SFTConfig(output_dir="out/sft", **STEPS), train_dataset=sft,
                                    processing_class=tokenizer()))  # fmt: skip

tools = load_dataset("json", data_files=tools_file, split="train")
tool_tokenizer = tokenizer(TOOL_TEMPLATE)
found["tool_calls_rendered"], found["tool_record_tokens"] = [], []
for record in tools:
    text = tool_tokenizer.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False)
    conversation = text.split("<|im_start|>user", 1)[1]  # after the system turn, where the template explains tools
    found["tool_calls_rendered"] += [
        part.split("</tool_call>")[0].strip() for part in conversation.split("<tool_call>")[1:]
    ]
    ids = tool_tokenizer.apply_chat_template(record["messages"], tools=record["tools"], return_dict=True)
    found["tool_record_tokens"].append(len(ids["input_ids"]))
found["tools_loss"] = loss(SFTTrainer(model=model, args=SFTConfig(output_dir="out/tools", max_length=1024, **STEPS),
                                      train_dataset=tools, processing_class=tool_tokenizer))  # fmt: skip

pairs = load_dataset("json", data_files=dpo_file, split="train")
dpo = DPOTrainer(model=model, args=DPOConfig(output_dir="out/dpo", **STEPS), train_dataset=pairs,
                 processing_class=tokenizer())  # fmt: skip
found["dpo_prompt_tokenized"] = dpo.processing_class.decode(dpo.train_dataset[0]["prompt_ids"])
found["dpo_loss"] = loss(dpo)

found["finite"] = all(math.isfinite(found[k]) for k in ("sft_loss", "tools_loss", "dpo_loss"))
print(json.dumps(found))
