"""Tokenizers: the built-in byte tokenizer, or a Hugging Face `tokenizer.json` by path."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes 0..255, end-of-text 256. Needs no files, so it runs anywhere."""

    name = "byte"
    vocab_size = 257

    def __init__(self, eos_id: Optional[int] = None):
        self.eos_id = 256 if eos_id is None else int(eos_id)
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"tokenizer.eos_id {self.eos_id} is outside the byte vocabulary (0..256)")
        self.sha256 = hashlib.sha256(f"longctx-byte-v1-eos{self.eos_id}".encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json; its identity is the file's sha256."""

    def __init__(self, path: str, eos_id: Optional[int] = None):
        from tokenizers import Tokenizer
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer.path {path}: no such file (expected a Hugging Face tokenizer.json)")
        self.tok = Tokenizer.from_file(str(p))
        self.name = p.name if p.name != "tokenizer.json" else f"{p.parent.name}/{p.name}"
        self.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            eos_id = next((self.tok.token_to_id(t) for t in EOS_NAMES if self.tok.token_to_id(t) is not None), None)
        if eos_id is None:
            raise ValueError(f"tokenizer {path}: no end-of-text token among {EOS_NAMES}; set tokenizer.eos_id")
        self.eos_id = int(eos_id)

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return [np.asarray(e.ids, dtype=dtype) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(cfg) -> "ByteTokenizer | HFTokenizer":
    """From the `tokenizer` config section (kind byte | hf)."""
    if cfg.kind == "byte":
        return ByteTokenizer(cfg.eos_id)
    if cfg.kind == "hf":
        return HFTokenizer(cfg.path, cfg.eos_id)
    raise ValueError(f"tokenizer.kind must be 'byte' or 'hf', got {cfg.kind!r}")


def token_dtype(vocab_size: int) -> str:
    """MDS column type of the shard schema (docs/ARCHITECTURE.md §3)."""
    return "ndarray:uint16" if vocab_size <= 65536 else "ndarray:uint32"


def identity(tok) -> dict:
    return {"kind": "byte" if isinstance(tok, ByteTokenizer) else "hf", "name": tok.name, "sha256": tok.sha256,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
