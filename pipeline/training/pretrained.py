"""`model.from_pretrained`, checked before any work (`longctx run` before it prepares data, and every
rank's preflight): the directory is there, its weights file has the sha256 the config pins
(`model.from_pretrained_sha256`), every tensor has the shape its config.json implies, and the tokenizer it
was trained with (tokenizer_info.json, which `longctx export` copies from the training checkpoint) is this
run's. A refusal names the file and `model.from_pretrained_recipe`, the command that makes the model again:
a damaged base found after the data is prepared costs minutes; one found never costs every result."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Dict

from ..config import Config, ConfigError
from ..model.config import Mamba2Config
from ..model.formats import CheckpointError, read_config, weight_files, weight_shapes
from ..model.mamba2 import shapes_only
from .checkpoint import TOKENIZER_INFO


def describe_tokenizer(tok: dict) -> str:
    """A tokenizer identity (data.tokenizer.identity) as one names it in an error."""
    return f"{tok.get('name')} (sha256 {str(tok.get('sha256'))[:12]}, vocabulary {tok.get('vocab_size')})"


def file_sha256(path: Path) -> str:
    """The file's sha256; computed once per process for a file of this size and modification time (`longctx run`
    checks the base before preparing data and again in its preflight: a 370M base is 1.5 GB to read)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Refusal:
    """Errors about one pretrained directory, each ending with how to make it again."""

    def __init__(self, cfg: Config, where: str):
        self.path, self.where = Path(cfg.model.from_pretrained), where
        recipe = cfg.model.from_pretrained_recipe
        self.remedy = (f"make it again with `{recipe}` (model.from_pretrained_recipe)" if recipe else
                       "point model.from_pretrained at the model you meant (model.from_pretrained_recipe, when "
                       "set, names the command that makes it)")

    def __call__(self, what: str) -> ConfigError:
        return ConfigError(f"{self.where}: model.from_pretrained: {what}; {self.remedy}")


def expected_shapes(config: Mamba2Config) -> Dict[str, tuple]:
    model = shapes_only(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(config: Mamba2Config, path: Path, refuse: Refusal) -> None:
    found, wanted = weight_shapes(path), expected_shapes(config)
    if config.tie_embeddings:
        wanted.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)     # a tied head may be stored; load_weights checks it equals
    missing, unexpected = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing or unexpected:
        raise refuse(f"the weights in {path} do not match its config.json: missing {missing[:4]}"
                     f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                     f"{' ...' if len(unexpected) > 4 else ''}")
    for key in sorted(wanted):
        if found[key] != wanted[key]:
            raise refuse(f"{key} in {path} has shape {list(found[key])}, but its config.json implies "
                         f"{list(wanted[key])}: the weights and the config are of different models")


def check_tokenizer(path: Path, tokenizer_identity: dict, refuse: Refusal) -> None:
    info = path / TOKENIZER_INFO
    if not info.exists():
        return                              # a model from elsewhere: the vocabulary checks in preflight apply
    trained_with = json.loads(info.read_text())
    if trained_with != tokenizer_identity:
        raise refuse(f"{path} was trained with the tokenizer {describe_tokenizer(trained_with)} ({info}), this "
                     f"run's is {describe_tokenizer(tokenizer_identity)}: set the tokenizer section to the model's")


def check_base(cfg: Config, where: str, tokenizer_identity: dict) -> Mamba2Config:
    """The architecture of `model.from_pretrained`, after every check above."""
    refuse = Refusal(cfg, where)
    path = refuse.path
    if not (path / "config.json").exists():
        raise refuse(f"{path}/config.json is not there" + ("" if path.is_dir() else f" ({path} does not exist)"))
    try:
        config = read_config(path)
        files = weight_files(path)
    except CheckpointError as e:
        raise refuse(str(e)) from None
    pinned = cfg.model.from_pretrained_sha256
    if pinned:
        if len(files) != 1:
            raise refuse(f"model.from_pretrained_sha256 pins one weights file, but {path} holds {len(files)} shards")
        actual = file_sha256(files[0])
        if actual != pinned:
            raise refuse(f"{files[0]} has sha256 {actual}, not {pinned} (model.from_pretrained_sha256): the file is "
                         "damaged or another model's")
    try:
        check_shapes(config, path, refuse)
    except ConfigError:
        raise
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:     # an unreadable weights file
        raise refuse(f"cannot read the weights of {path}: {e}") from None
    check_tokenizer(path, tokenizer_identity, refuse)
    return config
