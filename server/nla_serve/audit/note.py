"""The log's Ed25519 key and its checkpoints in the C2SP signed-note format.

A checkpoint (c2sp.org/tlog-checkpoint) is the note text::

    <origin>
    <tree size, decimal>
    <root hash, base64>

followed by a blank line and one signature line per signer (c2sp.org/signed-note)::

    — <key name> <base64(key id (4 bytes) || Ed25519 signature (64 bytes))>

The key id is ``SHA-256(name || "\\n" || 0x01 || public key)[:4]``; a verifier key is written
``<name>+<key id, hex>+<base64(0x01 || public key)>``, which is all an auditor needs to check a
checkpoint offline. The same key signs each record's statement (``record_statement``), so a row
inserted into the database by anyone else is caught even past the last checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG_ED25519 = b"\x01"
DASH = "\u2014"


class NoteError(ValueError):
    """A checkpoint or key that does not parse or does not verify; the message says which part."""


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclass(frozen=True)
class Verifier:
    """A public key with its name, as written in a verifier key string."""

    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, self.public)

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(ALG_ED25519 + self.public).decode()}"

    @classmethod
    def parse(cls, text: str) -> "Verifier":
        # the name and the hex id hold no '+', but standard base64 may: split twice only
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("a verifier key is <name>+<key id hex>+<base64 key>")
        name, kid, key = parts
        _check_name(name)
        try:
            raw = base64.b64decode(key, validate=True)
            kid_bytes = bytes.fromhex(kid)
        except ValueError:
            raise NoteError("the verifier key's id or key is not valid hex / base64") from None
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise NoteError("the verifier key is not an Ed25519 key (algorithm byte 0x01, 32 bytes)")
        v = cls(name, raw[1:])
        if v.key_id != kid_bytes:
            raise NoteError("the verifier key's id does not match its name and key")
        return v

    def check(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
            return True
        except (InvalidSignature, ValueError):
            return False


class LogKey:
    """The private key that signs records and checkpoints; created at first start (mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey, name: str):
        _check_name(name)
        self.private = private
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.verifier = Verifier(name, public)

    @classmethod
    def load_or_create(cls, path: Path, name: str | None = None) -> "LogKey":
        """Load the PEM key at ``path`` or create it; the key name defaults to ``nla-serve/<id>``
        so that two servers' logs never share an origin by accident."""
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise NoteError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
            try:
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise NoteError(f"{path} is not a PEM Ed25519 private key ({e})") from None
            if not isinstance(private, Ed25519PrivateKey):
                raise NoteError(f"{path} is not an Ed25519 key")
        else:
            private = Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            tmp = path.with_suffix(path.suffix + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        if name is None:
            public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            name = "nla-serve/" + hashlib.sha256(public).hexdigest()[:16]
        return cls(private, name)

    @property
    def origin(self) -> str:
        return self.verifier.name

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> bytes:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()

    def sign(self, key: LogKey) -> str:
        sig = key.verifier.key_id + key.sign(self.body())
        return (self.body() + b"\n").decode() + f"{DASH} {key.verifier.name} {base64.b64encode(sig).decode()}\n"


def open_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    """Parse a signed checkpoint and check its signature by ``verifier``; NoteError says why not."""
    if not isinstance(note, str) or "\n\n" not in note:
        raise NoteError("a signed note is its text, a blank line, then signature lines")
    text, _, sigs = note.partition("\n\n")
    lines = text.split("\n")
    if len(lines) < 3:
        raise NoteError("a checkpoint has an origin, a size and a root")
    origin, size_s, root_s = lines[:3]
    if not size_s.isdigit() or (size_s != "0" and size_s.startswith("0")):
        raise NoteError(f"checkpoint size {size_s!r} is not a decimal number")
    try:
        root_hash = base64.b64decode(root_s, validate=True)
    except ValueError:
        raise NoteError("the checkpoint's root is not base64") from None
    if len(root_hash) != 32:
        raise NoteError("the checkpoint's root is not a SHA-256 hash")
    if origin != verifier.name:
        raise NoteError(f"the checkpoint is for log {origin!r}, not {verifier.name!r}")
    message = (text + "\n").encode()
    for line in sigs.split("\n"):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise NoteError(f"malformed signature line {line!r}")
        if parts[1] != verifier.name:
            continue  # another signer's (a witness): not ours to check
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except ValueError:
            raise NoteError("a signature is not base64") from None
        if len(raw) != 68 or raw[:4] != verifier.key_id:
            continue
        if verifier.check(message, raw[4:]):
            return Checkpoint(origin, int(size_s), root_hash)
        raise NoteError(f"the signature by {verifier.name} does not verify: the checkpoint was altered or forged")
    raise NoteError(f"the checkpoint carries no signature by {verifier.name}")


def record_statement(origin: str, seq: int, leaf: bytes) -> bytes:
    """What the log key signs for each record: its log, position and leaf hash."""
    return f"nla-serve audit record\n{origin}\n{seq}\n{base64.b64encode(leaf).decode()}\n".encode()
