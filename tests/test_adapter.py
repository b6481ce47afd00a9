"""`nla-serve adapter`: the LoRA fine-tune the README's comparison report is made with. Its
examples train on the answer only; its folder is PEFT's layout, which --lora-modules reads and
the reference engine serves, and its training lowers the loss."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoTokenizer

from nla_serve.adapters import load_adapters
from nla_serve.train.adapter import examples, kjv_answers


def test_examples_put_the_loss_on_the_answer_only(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.target)
    [(ids, labels)] = examples(tok, 1, seed=3)
    answer = [t for t in labels if t != -100]
    cut = labels.index(answer[0])
    assert all(t == -100 for t in labels[:cut]) and labels[cut:] == ids[cut:]
    assert tok.decode(answer, skip_special_tokens=True).strip().startswith(kjv_answers(1, 3)[0][:20])
    assert len(set(kjv_answers(50, 0))) == 50


def test_the_adapter_command_writes_a_servable_peft_folder_and_learns(tiny, tmp_path):
    out = tmp_path / "kjv"
    run = subprocess.run([sys.executable, "-m", "nla_serve", "adapter", "--model", str(tiny.target), "--out", str(out),
                          "--steps", "30", "--rank", "4", "--lr", "5e-3", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["last_loss"] < summary["first_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    [adapter] = load_adapters({"kjv": str(out)}, max_rank=16, base_name="tiny").values()
    assert adapter.path == str(out.resolve())
