"""Tiny random models in exactly the released layouts, built in well under a second.

Used by the test suite and the benchmarks: a Llama target (vocabulary 512, hidden 64, 2 heads of
32, 4 blocks) with a byte-level BPE tokenizer and a ChatML chat template, and an NLA pair for it:
an AV folder (same architecture, its own random weights, ``nla_meta.yaml``) and an AR folder
truncated to K+1 blocks with no final norm and no lm_head weights, plus ``value_head.safetensors``.

The tokenizer prepends BOS through its post-processor *and* the chat template renders
``bos_token``, so code that renders a template to a string and re-tokenizes it with special tokens
gets a double BOS, the same trap real Llama/Gemma tokenizers set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nla_serve.nla.sidecar import MARKER, ar_meta, av_meta, write_meta

# ChatML, with tools the Hermes way (a system turn listing them; calls written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, which vLLM's "hermes" parser reads)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth.",
    "<explanation> The text is about a concept. </explanation>",
    "Python is a programming language; def f(x): return x + 1",
    "Explain the concept <concept> in plain words. user assistant system",
    "<text> summary </text> The final token is a word about animals and numbers 0123456789.",
]


@dataclass(frozen=True)
class TinyPaths:
    target: Path
    av: Path
    ar: Path
    layer: int


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # leave room for the marker
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tok.add_tokens([MARKER])  # one token, like the rare CJK characters real NLAs use
    bos = SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[0],
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_target(path: str | Path, *, layers: int = 4, hidden: int = 64, seed: int = 0,
                 init_std: float = 0.08, tokenizer=None, family: str = "llama") -> Path:
    """A random Llama folder (config, safetensors, tokenizer, generation config, chat template);
    ``family="gemma3"`` makes a Gemma-3 text model of the same size instead (sliding-window and
    global layers alternating, as in the released Gemma-3 targets)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = tokenizer or build_tokenizer()
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    extra = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
             + ["sliding_attention"] * (layers % 2), "query_pre_attn_scalar": 32} if family == "gemma3" else {}
    cfg = config_class(
        **extra,
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    # Random norms around 1 and peaky logits keep greedy choices far from ties, so two correct
    # implementations agree token for token.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(path)
    return path


def build_lora(target: str | Path, out: str | Path, *, rank: int = 4, scale: float = 0.5, seed: int = 0) -> Path:
    """A random LoRA adapter of ``target`` (q and v projections of every block) in PEFT's layout,
    large enough to change greedy output: what `--lora-modules` serves in the tests."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(target) / "config.json").read_text())
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    widths = {"q_proj": d, "v_proj": kv * (d // heads)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, width in widths.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d, generator=g) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g) * scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(widths), "base_model_name_or_path": str(target), "bias": "none",
        "fan_in_fan_out": False}, indent=2))
    return out


def build_nla(root: str | Path, target: str | Path, layer: int, *, seed: int = 1) -> tuple[Path, Path]:
    """AV and AR folders for ``target`` in the released layout; returns (av, ar)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    root, target = Path(root), Path(target)
    tok = AutoTokenizer.from_pretrained(target)
    cfg = AutoConfig.from_pretrained(target)
    d = cfg.hidden_size

    av = root / "av"
    build_target(av, layers=cfg.num_hidden_layers, hidden=d, seed=seed, tokenizer=tok)
    write_meta(av / "nla_meta.yaml", av_meta(tok, layer, d))

    ar = root / "ar"
    ar_cfg = AutoConfig.from_pretrained(target)
    ar_cfg.num_hidden_layers = layer + 1
    torch.manual_seed(seed + 1)
    model = LlamaForCausalLM(ar_cfg).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not (k.startswith("lm_head") or k == "model.norm.weight")}
    ar.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(ar / "model.safetensors"),
              metadata={"format": "pt"})
    ar_cfg.save_pretrained(ar)
    tok.save_pretrained(ar)
    head = torch.randn(d, d, generator=torch.Generator().manual_seed(seed + 2)) / math.sqrt(d)
    save_file({"weight": head}, str(ar / "value_head.safetensors"))
    write_meta(ar / "nla_meta.yaml", ar_meta(tok, layer, d))
    return av, ar


def build_all(root: str | Path, *, layers: int = 4, layer: int = 2) -> TinyPaths:
    root = Path(root)
    target = build_target(root / "target", layers=layers)
    av, ar = build_nla(root / "nla", target, layer)
    return TinyPaths(target=target, av=av, ar=ar, layer=layer)


if __name__ == "__main__":  # python -m nla_serve.tiny DIR
    import sys

    paths = build_all(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(json.dumps({k: str(v) for k, v in paths.__dict__.items()}))
