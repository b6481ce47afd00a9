"""RFC 6962 / RFC 9162 Merkle trees: hashing, proofs, and verifiers that reject adversarial input.

Leaf ``SHA-256(0x00 || entry)``; node ``SHA-256(0x01 || left || right)``; the empty tree's root is
``SHA-256("")``. Trees are split at the largest power of two below their size, so every
left subtree is *perfect* and aligned; the log stores exactly those perfect subtrees as nodes
``(level, index)`` (the subtree over leaves ``[index << level, (index + 1) << level)``) and
computes the ragged right edge on demand. ``Frontier`` is the right edge kept while appending.

The verifiers are the RFC 9162 section 2.1.3.2 and 2.1.4.2 algorithms, with every length and
bound checked before use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

EMPTY_ROOT = hashlib.sha256(b"").digest()
NodeReader = Callable[[int, int], bytes]  # (level, index) of a perfect aligned subtree -> its hash


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


@dataclass
class Frontier:
    """The perfect subtrees on the tree's right edge, largest first: enough to append a leaf and
    to compute the root, in O(log n) memory. ``append`` returns the nodes it completed, which the
    log stores."""

    size: int = 0
    stack: list[tuple[int, bytes]] = field(default_factory=list)  # (level, hash)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        index = self.size
        made = [(0, index, leaf)]
        self.stack.append((0, leaf))
        level = 0
        while len(self.stack) >= 2 and self.stack[-1][0] == self.stack[-2][0]:
            (_, right), (_, left) = self.stack.pop(), self.stack.pop()
            level += 1
            parent = node_hash(left, right)
            self.stack.append((level, parent))
            made.append((level, index >> level, parent))
        self.size += 1
        return made

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        acc = self.stack[-1][1]
        for _, h in reversed(self.stack[:-1]):
            acc = node_hash(h, acc)
        return acc

    @classmethod
    def load(cls, size: int, node: NodeReader) -> "Frontier":
        """The frontier of a stored tree of ``size`` leaves, from its perfect subtrees."""
        stack, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                stack.append((level, node(level, start >> level)))
                start += 1 << level
        return cls(size, stack)


def subtree_root(start: int, end: int, node: NodeReader) -> bytes:
    """MTH of leaves ``[start, end)``, ``start`` aligned as RFC 6962's recursion leaves it."""
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0:
        return node(n.bit_length() - 1, start >> (n.bit_length() - 1))
    k = _split(n)
    return node_hash(subtree_root(start, start + k, node), subtree_root(start + k, end, node))


def root(size: int, node: NodeReader) -> bytes:
    return subtree_root(0, size, node)


def inclusion_proof(index: int, size: int, node: NodeReader) -> list[bytes]:
    """PATH(index, D[size]) of RFC 6962 2.1.1."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree_root(start + k, end, node))
            end = start + k
        else:
            path.append(subtree_root(start, start + k, node))
            start += k
    return path[::-1]


def consistency_proof(old: int, new: int, node: NodeReader) -> list[bytes]:
    """PROOF(old, D[new]) of RFC 6962 2.1.2."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    proof: list[bytes] = []
    start, end, m, complete = 0, new, old, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                proof.append(subtree_root(start, end, node))
            break
        k = _split(n)
        if m <= k:
            proof.append(subtree_root(start + k, end, node))
            end = start + k
        else:
            proof.append(subtree_root(start, start + k, node))
            start, m, complete = start + k, m - k, False
    return proof[::-1]


class ProofError(ValueError):
    """A proof that does not prove what it claims; the message says why."""


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, (bytes, bytearray)) or len(h) != 32:
            raise ProofError("every hash in a proof must be 32 bytes")


def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], root_hash: bytes) -> None:
    """Raise ProofError unless ``proof`` shows ``leaf`` at ``index`` of the tree ``root_hash``."""
    _check_hashes(leaf, root_hash, *proof)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the proof is shorter than the tree is deep")
    if r != root_hash:
        raise ProofError("the proof does not lead to the checkpoint's root")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> None:
    """Raise ProofError unless the tree of size ``new`` extends the one of size ``old``."""
    _check_hashes(old_root, new_root, *proof)
    if not 0 <= old <= new:
        raise ProofError(f"a log cannot shrink from {old} to {new} records")
    if old == new:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old}: the log forked")
        return
    if old == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"the proof does not lead to the root of size {old}")
    if sr != new_root:
        raise ProofError(f"the proof does not lead to the root of size {new}")


class MemoryTree:
    """A whole tree in memory (tests, verification, offline tools): nodes computed from leaves."""

    def __init__(self, leaves: list[bytes] | None = None):
        self.frontier = Frontier()
        self.nodes: dict[tuple[int, int], bytes] = {}
        for leaf in leaves or []:
            self.append(leaf)

    def append(self, leaf: bytes) -> None:
        for level, index, h in self.frontier.append(leaf):
            self.nodes[level, index] = h

    def node(self, level: int, index: int) -> bytes:
        return self.nodes[level, index]

    @property
    def size(self) -> int:
        return self.frontier.size
