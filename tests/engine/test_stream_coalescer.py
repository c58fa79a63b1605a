"""Joining a stream's outputs within a window: nothing lost, nothing reordered, first and
last never wait."""

from __future__ import annotations

import pytest

from services.engine.request import FinishReason, RequestOutput
from services.engine.stream_coalescer import StreamCoalescer, join_outputs


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [token], f"<{token}>", [-0.5 * token], finished=finished,
                         finish_reason=FinishReason.STOP if finished else None, num_prompt_tokens=3,
                         num_output_tokens=token, num_cached_prompt_tokens=0)


def _tokens(outputs: list[RequestOutput]) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for o in outputs:
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


def test_first_goes_at_once_then_a_window_joins_the_rest():
    c = StreamCoalescer(0.1)
    assert _tokens(c.take([_out("a", 1)], now=0.0)) == {"a": [1]}
    assert c.take([_out("a", 2)], now=0.03) == []
    assert c.take([_out("a", 3)], now=0.06) == []
    (sent,) = c.take([], now=0.1)  # the window closed: one message for both
    assert (sent.new_token_ids, sent.new_text, sent.new_logprobs) == ([2, 3], "<2><3>", [-1.0, -1.5])
    assert sent.num_output_tokens == 3
    assert c.take([_out("a", 4)], now=0.15) == []  # a new window opened when it was sent
    assert _tokens(c.take([_out("a", 5)], now=0.2)) == {"a": [4, 5]}


def test_the_last_output_takes_what_is_held_with_it():
    c = StreamCoalescer(1.0)
    c.take([_out("a", 1)], now=0.0)
    c.take([_out("a", 2)], now=0.1)
    (last,) = c.take([_out("a", 3, finished=True)], now=0.2)
    assert last.new_token_ids == [2, 3] and last.finished and last.finish_reason is FinishReason.STOP
    assert len(c) == 0
    assert c.take([], now=5.0) == []


def test_a_quiet_window_lapses_so_the_next_token_is_not_delayed():
    c = StreamCoalescer(0.05)
    c.take([_out("a", 1)], now=0.0)
    assert c.take([], now=0.06) == []  # nothing held: the window ends without a message
    assert _tokens(c.take([_out("a", 2)], now=0.5)) == {"a": [2]}


def test_streams_have_their_own_windows():
    c = StreamCoalescer(0.1)
    assert _tokens(c.take([_out("a", 1), _out("b", 1)], now=0.0)) == {"a": [1], "b": [1]}
    assert _tokens(c.take([_out("a", 2), _out("c", 1)], now=0.05)) == {"c": [1]}
    assert _tokens(c.take([_out("a", 3), _out("b", 2)], now=0.1)) == {"a": [2, 3], "b": [2]}


def test_take_held_hands_over_and_forgets_the_stream():
    c = StreamCoalescer(1.0)
    c.take([_out("a", 1)], now=0.0)
    c.take([_out("a", 2)], now=0.1)
    assert c.take_held("a").new_token_ids == [2]
    assert c.take_held("a") is None
    assert _tokens(c.take([_out("a", 3)], now=0.2)) == {"a": [3]}  # a stream of that id starts afresh


def test_join_keeps_order_and_the_later_status():
    joined = join_outputs(_out("a", 1), _out("a", 2, finished=True))
    assert joined.new_token_ids == [1, 2] and joined.finished and joined.num_output_tokens == 2


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_bad_interval_is_refused(interval):
    with pytest.raises(ValueError):
        StreamCoalescer(interval)
