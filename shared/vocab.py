"""A tokenizer seen as bytes: every token id maps to the exact UTF-8 bytes it contributes.

Both sides reason about text as bytes (a token may hold half a character), so this table is
the one place that knows each family's conventions: byte-level BPE's `Ġ` alphabet,
SentencePiece's `▁` spaces and `<0xNN>` byte fallback, added and special tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from shared.errors import UserFacingError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SENTENCEPIECE_SPACE = "\u2581"


class TokenFamily(Enum):
    BYTE_LEVEL_BPE = "byte_level_bpe"
    SENTENCEPIECE = "sentencepiece"


class VocabError(UserFacingError, ValueError):
    """A tokenizer whose conventions specbridge cannot map to bytes."""


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte <-> printable character table (inverse direction: character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(f"{type(tokenizer).__name__} is not a fast tokenizer; specbridge needs one")
    spec = json.loads(backend.to_str()).get("decoder") or {}
    found: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "type" in node:
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _family(tokenizer: PreTrainedTokenizerBase) -> TokenFamily:
    decoders = _decoder_types(tokenizer)
    if "ByteLevel" in decoders:
        return TokenFamily.BYTE_LEVEL_BPE
    if decoders & {"Metaspace", "ByteFallback", "Replace"}:
        return TokenFamily.SENTENCEPIECE
    raise VocabError(f"unsupported tokenizer decoder {sorted(decoders) or 'none'}: expected byte-level BPE or SentencePiece")


def _token_bytes_table(tokenizer: PreTrainedTokenizerBase, family: TokenFamily, special_ids: frozenset[int]) -> tuple[bytes, ...]:
    added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    alphabet = _byte_level_alphabet() if family is TokenFamily.BYTE_LEVEL_BPE else {}
    table: list[bytes] = []
    for index, piece in enumerate(pieces):
        if index in special_ids or piece is None:
            table.append(b"")
        elif index in added:
            table.append(added[index].encode("utf-8"))
        elif family is TokenFamily.BYTE_LEVEL_BPE:
            table.append(bytes(alphabet[ch] for ch in piece) if all(ch in alphabet for ch in piece) else piece.encode("utf-8"))
        else:
            fallback = _BYTE_FALLBACK.match(piece)
            table.append(bytes([int(fallback.group(1), 16)]) if fallback else piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
    return tuple(table)


@dataclass(frozen=True, eq=False)
class Vocab:
    """A fast tokenizer plus its byte table; the unit of truth is bytes, never decoded strings."""

    tokenizer: PreTrainedTokenizerBase
    family: TokenFamily
    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]
    eos_ids: frozenset[int]
    bos_id: int | None
    max_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_token_bytes", max(len(b) for b in self.token_bytes))

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, extra_eos_ids: Iterable[int] = ()) -> Vocab:
        family = _family(tokenizer)
        special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            index for index, token in tokenizer.added_tokens_decoder.items() if token.special
        )
        eos_ids = frozenset(i for i in (tokenizer.eos_token_id, *extra_eos_ids) if i is not None)
        return cls(
            tokenizer=tokenizer,
            family=family,
            token_bytes=_token_bytes_table(tokenizer, family, special_ids),
            special_ids=special_ids,
            eos_ids=eos_ids,
            bos_id=tokenizer.bos_token_id,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Vocab:
        """The tokenizer saved in a model directory, with the EOS ids its generation config adds (Gemma has two)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        extra: list[int] = []
        generation_config = Path(path) / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else list(eos or [])
        return cls.from_tokenizer(tokenizer, extra_eos_ids=extra)

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        """Ids for plain text: no BOS/EOS added, and special-token look-alikes stay literal text."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def token_text(self, token_id: int) -> str:
        """Printable form for alignment costs: a partial character shows as U+FFFD."""
        return self.token_bytes[token_id].decode("utf-8", errors="replace")

    @cached_property
    def id_by_bytes(self) -> dict[bytes, int]:
        """Non-special tokens by their bytes; where several ids share bytes the lowest wins."""
        table: dict[bytes, int] = {}
        for index, data in enumerate(self.token_bytes):
            if data and index not in self.special_ids:
                table.setdefault(data, index)
        return table

    def longest_match_ids(self, data: bytes) -> list[int]:
        """A valid (not necessarily canonical) tokenization of any bytes, greedy longest match."""
        ids: list[int] = []
        position = 0
        table = self.id_by_bytes
        while position < len(data):
            for length in range(min(self.max_token_bytes, len(data) - position), 0, -1):
                token_id = table.get(data[position : position + length])
                if token_id is not None:
                    ids.append(token_id)
                    position += length
                    break
            else:
                raise VocabError(f"byte 0x{data[position]:02x} has no token in this vocabulary (no byte fallback)")
        return ids

    def validate_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise VocabError(f"token ids out of range [0, {self.size}): {bad[:5]}")
