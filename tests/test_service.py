"""Start-up: folders and hub ids for --model / --nla-av, and the errors that say what went wrong."""

from __future__ import annotations

import asyncio

import pytest

from nla_serve.config import ServerSettings
from nla_serve.errors import CheckpointError
from nla_serve.service import Service, resolve_folder


def test_hub_id_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no network: download the model elsewhere"):
        resolve_folder("some-org/some-model-that-is-not-here", "--model")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder for --nla-av"):
        resolve_folder(str(tmp_path / "nope"), "--nla-av")


def test_bad_nla_fails_at_start_not_at_generation(tiny, tmp_path):
    import shutil

    import yaml

    bad = tmp_path / "av"
    shutil.copytree(tiny.av, bad)
    meta = yaml.safe_load((bad / "nla_meta.yaml").read_text())
    meta["tokens"]["injection_left_neighbor_id"] = 3
    (bad / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    settings = ServerSettings.flat(model=str(tiny.target), nla_av=str(bad), engine="transformers", device="cpu")
    with pytest.raises(CheckpointError, match="injection_left_neighbor_id"):
        asyncio.run(Service.start(settings))
