"""Settings as sub-models (config.py): built once, flat flag names placed in their sections, and
the engine slices cut from them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nla_serve.config import FLAT_NAMES, ServerSettings


def test_flat_names_land_in_their_sections():
    s = ServerSettings.flat(model="/m", engine="transformers", nla_av="/av", audit_db="/a.db", port=9000,
                            explain_concurrency=3, target_memory_fraction=0.5, engine_restarts=2)
    assert (s.target.model, s.target.engine, s.target.memory_fraction, s.target.restarts) == ("/m", "transformers",
                                                                                                0.5, 2)
    assert (s.nla.av, s.audit.db, s.api.port, s.worker.concurrency) == ("/av", "/a.db", 9000, 3)
    assert s.audit_location == "/a.db"


def test_every_flat_name_points_at_a_real_field():
    for name, path in FLAT_NAMES.items():
        section, _, field = path.partition(".")
        assert section in ServerSettings.model_fields, name
        if field:
            assert field in ServerSettings.model_fields[section].annotation.model_fields, name


def test_unknown_and_invalid_settings_are_refused_with_their_names():
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        ServerSettings.flat(nope=1)
    with pytest.raises(ValidationError, match="port"):
        ServerSettings.flat(port=70000)
    with pytest.raises(ValidationError, match="needs --engine vllm"):
        ServerSettings.flat(engine="transformers", parallel={"tensor_parallel_size": 2})


def test_engine_slices():
    s = ServerSettings.flat(model="/m", device="cpu", dtype="bfloat16", nla_dtype="float32", kv_cache_gib=0.5,
                            verbalizer_url=("http://a:1/v1",))
    target = s.target_engine("/m", 20)
    assert (target.capture_layer, target.dtype, target.kv_cache_gib, target.device) == (20, "bfloat16", 0.5, "cpu")
    verbalizer = s.verbalizer_engine("/av")
    assert verbalizer.kind == "remote" and verbalizer.dtype == "float32" and verbalizer.enable_prompt_embeds
    assert verbalizer.remote.urls == ("http://a:1",)
    assert s.reconstructor().dtype == "float32"


def test_replace_changes_one_setting_and_keeps_the_rest():
    s = ServerSettings.flat(model="/m", api_key="k")
    t = s.replace(max_concurrent_requests=1, explain_cache_size=0)
    assert (t.api.max_concurrent_requests, t.api.api_key, t.worker.cache_size, t.target.model) == (1, "k", 0, "/m")
    assert s.api.max_concurrent_requests == 64
    with pytest.raises(ValidationError, match="port"):
        s.replace(port=-1)



def test_agent_and_adapter_settings_refuse_what_cannot_work():
    import pytest

    from nla_serve.config import ServerSettings

    with pytest.raises(ValueError, match="--enable-lora needs --lora-modules"):
        ServerSettings.flat(enable_lora=True)
    with pytest.raises(ValueError, match="--lora-modules needs --engine vllm"):
        ServerSettings.flat(engine="transformers", lora_modules={"a": "/x"})
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        ServerSettings.flat(enable_auto_tool_choice=True)
    ok = ServerSettings.flat(lora_modules={"a": "/x"}, tool_call_parser="hermes", enable_auto_tool_choice=True)
    engine = ok.target_engine("/m", None)
    assert engine.max_loras == 4 and ok.api.tool_call_parser == "hermes"


def test_split_cores_gives_the_target_the_first_half_unless_the_operator_bound_them(monkeypatch):
    from nla_serve.engine_config import split_cores

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert split_cores([0, 1]) == ("0", "1")
    assert split_cores([4, 5, 6, 7, 8]) == ("4,5,6", "7,8")
    assert split_cores([3]) == (None, None)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert split_cores([0, 1]) == (None, None)
