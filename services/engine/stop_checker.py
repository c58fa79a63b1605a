"""After a token is appended: render its text, and decide whether the request stops.

Text is streamed with a hold-back: while a request has stop strings, the last
``len(longest stop) - 1`` characters are kept until it is clear they do not start a
stop string, so a client never sees text that is later cut.
"""

from __future__ import annotations

from services.engine.request import FinishReason, Request
from services.engine.tokenizer import IncrementalDetokenizer, TextTokenizer

_DETOKENIZE_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output token


class OutputTracker:
    """Per-request text state: what has been rendered and what has been emitted."""

    def __init__(self, request: Request, tokenizer: TextTokenizer | None, eos_token_ids: tuple[int, ...]):
        self.request = request
        self._eos = () if request.params.ignore_eos else eos_token_ids
        self._detok = None
        if tokenizer is not None:
            self._detok = IncrementalDetokenizer(tokenizer, request.num_tokens, _DETOKENIZE_CONTEXT_TOKENS)
        self._holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self._emitted = len(request.output_text)

    def banned_token_ids(self, ahead: int = 0) -> tuple[int, ...]:
        """Tokens that may not be sampled yet (stop tokens before min_tokens), for the output
        token ``ahead`` places after the next one (a step launched before its predecessor's
        token was appended)."""
        if self.request.num_output_tokens + ahead >= self.request.params.min_tokens:
            return ()
        return self._eos + self.request.params.stop_token_ids

    def on_token(self, token_id: int, max_model_len: int) -> FinishReason | None:
        """Render the just-appended token; returns why the request finishes, if it does."""
        r, p = self.request, self.request.params
        if token_id in self._eos or token_id in p.stop_token_ids:
            return FinishReason.STOP
        if self._detok is not None:
            previous = len(r.output_text)
            r.output_text += self._detok.step(r.token_ids)
            if p.stop and self._cut_at_stop_string(previous):
                return FinishReason.STOP
        if r.num_output_tokens >= r.max_tokens or r.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def on_finish(self, reason: FinishReason) -> None:
        if self._detok is not None and reason is FinishReason.LENGTH:
            self.request.output_text += self._detok.flush(self.request.token_ids)

    def take_text(self, finished: bool) -> str:
        """Text not yet emitted, less the hold-back while unfinished."""
        text = self.request.output_text
        end = len(text) if finished else max(self._emitted, len(text) - self._holdback)
        delta = text[self._emitted : end]
        self._emitted = end
        return delta

    def _cut_at_stop_string(self, previous_len: int) -> bool:
        text = self.request.output_text
        search_from = max(0, previous_len - self._holdback)
        hits = [i for i in (text.find(s, search_from) for s in self.request.params.stop) if i >= 0]
        if not hits:
            return False
        self.request.output_text = text[: min(hits)]
        return True
