"""The run's tokenizer as a Hugging Face tokenizer directory, written beside an exported model so that tools which
take a model directory (transformers' AutoTokenizer, lm-eval, vLLM) load both: tokenizer.json,
tokenizer_config.json, special_tokens_map.json and generation_config.json.

The byte tokenizer becomes a byte-level BPE without merges whose ids are the bytes themselves: GPT-2's
byte-to-character table (each of the 256 bytes a printable character, so the BPE vocabulary can hold it) maps
byte b to the token of id b, and the end-of-text token keeps its id. A Hugging Face tokenizer is its own
tokenizer.json."""
from __future__ import annotations

import json
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def byte_to_char() -> dict:
    """GPT-2's table: printable bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer(eos_id: int = 256):
    """A `tokenizers.Tokenizer` equal to ByteTokenizer(eos_id): each UTF-8 byte its own id, eos_id the end-of-text
    token (256 by default; another id makes that byte's token the end-of-text one, as ByteTokenizer does)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: b for b, ch in byte_to_char().items()}
    if eos_id == 256:
        vocab[EOS_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if eos_id == 256:
        tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok


def write_hf_tokenizer(out: Path, tokenizer_info: dict) -> list:
    """The tokenizer of `tokenizer_info` (a training checkpoint's record; a Hugging Face one's tokenizer.json
    already copied into `out`) as a transformers tokenizer directory, and generation_config.json; the files."""
    from transformers import PreTrainedTokenizerFast
    out = Path(out)
    eos_id = int(tokenizer_info["eos_id"])
    if tokenizer_info["kind"] == "byte":
        fast = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(eos_id))
    else:
        fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    eos = fast.convert_ids_to_tokens(eos_id)
    fast.eos_token = fast.pad_token = eos
    written = [Path(p).name for p in fast.save_pretrained(str(out))]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "pad_token_id": eos_id},
                                                           indent=1))
    return sorted(set(written) | {"generation_config.json"})
