"""Text <-> token ids through the checkpoint's ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from services.engine.errors import ModelLoadError


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "TextTokenizer | None":
        """The directory's tokenizer, or None when it has no ``tokenizer.json``."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"cannot read {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas.

    A token may end in the middle of a UTF-8 character (byte-level BPE) or change how
    the previous token renders (SentencePiece spaces), so each delta is the difference
    between decoding a short window with and without the newest tokens, and nothing
    is emitted while the window ends in an incomplete character.
    """

    def __init__(self, tokenizer: TextTokenizer, num_rendered: int, context: int):
        """``num_rendered`` leading ids (the prompt, and any output already shown) are not
        emitted again; up to ``context`` of them are decoded along for correct spacing."""
        self._tok = tokenizer
        self._prefix = max(0, num_rendered - context)  # window start, kept for context
        self._read = num_rendered  # ids whose text has been emitted

    def step(self, ids: list[int]) -> str:
        before = self._tok.decode(ids[self._prefix : self._read])
        after = self._tok.decode(ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return after[len(before) :]

    def flush(self, ids: list[int]) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._tok.decode(ids[self._prefix : self._read])
        after = self._tok.decode(ids[self._prefix :])
        self._prefix = self._read = len(ids)
        return after[len(before) :] if len(after) > len(before) else ""
