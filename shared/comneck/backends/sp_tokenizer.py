"""LLaMA's sentencepiece tokenizer as the release-era (transformers ~4.28-4.31) slow tokenizer ran it.

Shikra and Honeybee were trained and evaluated with ``LlamaTokenizer(use_fast=False)`` of that
era: the text is split at added tokens (``<im_start>``, ``<im_patch>``, ``<im_end>``), the
whitespace next to them is stripped, and every chunk goes through sentencepiece on its own,
which puts its dummy-prefix space in front of each chunk. transformers 5 ships only the
tokenizers-backed ``LlamaTokenizer``, whose handling of those boundaries differs, so the
sentencepiece model (the maintained library the slow tokenizer wrapped) is driven directly here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import ComneckInputError, ErrorCode


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def folder_clean_up(folder: Path) -> bool:
    """Whether transformers' tokenizer loaded from ``folder`` removes the space before punctuation
    when decoding: ``clean_up_tokenization_spaces`` of its ``tokenizer_config.json`` (Vicuna v1.5's
    says false; ``batch_decode`` honours it). Without the file or the key, False: LlamaTokenizer's
    own default, an ``__init__`` argument from the release-era slow tokenizer (4.28-4.31) to 5.x."""
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ComneckInputError(f"{config_file}: not JSON ({exc})", ErrorCode.BAD_WEIGHTS) from None
    value = config.get("clean_up_tokenization_spaces", False) if isinstance(config, dict) else None
    if not isinstance(value, bool):
        raise ComneckInputError(f"{config_file}: clean_up_tokenization_spaces is {value!r}; expected true or false in a JSON object",
                                ErrorCode.BAD_WEIGHTS)
    return value


class SentencePieceTokenizer:
    """``tokenizer.model`` plus the added tokens (``added_tokens.json``) of a LLaMA checkpoint folder.

    ``pad_token_id`` is the unknown token's id, as Shikra (v1) and Honeybee set it. ``clean_up``
    False decodes as sentencepiece does, with no space removed before punctuation (Meta's own
    LLaMA tokenizer, which LLaMA-Adapter decodes with; transformers' LlamaTokenizer by default).
    """

    def __init__(self, model_file: str | Path, added_tokens: dict[str, int] | None = None, clean_up: bool = True) -> None:
        import sentencepiece

        self.model_file = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ComneckInputError(f"{model_file}: not a sentencepiece model ({exc})", ErrorCode.BAD_WEIGHTS) from None
        self.base_vocab_size = int(self.sp.GetPieceSize())
        self.added = dict(added_tokens or {})
        self.clean_up = clean_up
        expected = list(range(self.base_vocab_size, self.base_vocab_size + len(self.added)))
        if sorted(self.added.values()) != expected:
            raise ComneckInputError(
                f"added tokens {self.added} must take the ids right after the {self.base_vocab_size}-piece vocabulary",
                ErrorCode.BAD_WEIGHTS,
            )
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")") if self.added else None
        self.bos_token_id = int(self.sp.bos_id())
        self.eos_token_id = int(self.sp.eos_id())
        self.unk_token_id = int(self.sp.unk_id())
        self.pad_token_id = self.unk_token_id
        self._skipped = {self.bos_token_id, self.eos_token_id, self.unk_token_id, *self.added.values()}

    @classmethod
    def from_folder(cls, folder: str | Path, clean_up: bool | None = None) -> "SentencePieceTokenizer":
        """Read ``tokenizer.model`` and, if present, ``added_tokens.json`` from a checkpoint folder;
        ``clean_up`` None decodes as the folder's ``tokenizer_config.json`` says (:func:`folder_clean_up`)."""
        folder = Path(folder)
        model = folder / "tokenizer.model"
        if not model.is_file():
            raise ComneckInputError(f"{folder}: no tokenizer.model", ErrorCode.BAD_WEIGHTS)
        added_file = folder / "added_tokens.json"
        added = json.loads(added_file.read_text()) if added_file.is_file() else {}
        return cls(model, {str(k): int(v) for k, v in added.items()}, folder_clean_up(folder) if clean_up is None else clean_up)

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added)

    def token_id(self, token: str) -> int:
        """The id of an added token (``<im_patch>``, ...)."""
        try:
            return self.added[token]
        except KeyError:
            raise ComneckInputError(f"the tokenizer has no {token!r} token", ErrorCode.BAD_WEIGHTS) from None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """``text`` -> ids: split at added tokens with the whitespace beside them stripped, each
        chunk encoded by sentencepiece on its own (its own dummy prefix), BOS first if asked."""
        ids = [self.bos_token_id] if bos else []
        parts = self._split.split(text) if self._split else [text]
        for i, part in enumerate(parts):
            if part in self.added:
                ids.append(self.added[part])
                continue
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            if part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text as the slow tokenizer decoded answers (special tokens skipped, spaces
        before punctuation cleaned up unless ``clean_up`` is off)."""
        kept = [i for i in ids if not (skip_special_tokens and i in self._skipped) and 0 <= i < self.base_vocab_size]
        text = self.sp.DecodeIds(kept)
        return _clean_up(text) if self.clean_up else text

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]
