"""The node's process messages on the wire (transfer's codec), and its one output record."""

from __future__ import annotations

import msgpack
import pytest

from node.messages import (
    CODEC,
    AbortRequest,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    TokenOutput,
)
from transfer.codec import MessageCodec


@pytest.mark.parametrize(
    "msg",
    [
        GenerateRequest("r", [1, 2, 3], {"max_tokens": 4, "stop": ["x"]}, "10.0.0.1", 8998, 2**62),
        GenerateRequest("r", [1], {}),
        AbortRequest("r"),
        ControlRequest(3, "server_info"),
        ControlReply(3, True, {"free_pages": 7, "role": "decode"}),
        TokenOutput("r", [5, 6], "ab", True, "stop", "</s>", 3, 2, 1, [-0.5, -1.0], [[[5, -0.5]]]),
        TokenOutput.failure("r", "KV transfer failed", 502),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_round_trips(msg: object) -> None:
    assert CODEC.decode(CODEC.encode(msg)) == msg


def test_unknown_malformed_and_short_frames_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown message type 'Pickled'"):
        CODEC.decode(msgpack.packb(["Pickled", 1]))
    with pytest.raises(ValueError, match="AbortRequest carries 2 fields, expected 1"):
        CODEC.decode(msgpack.packb(["AbortRequest", "r", "extra"]))
    with pytest.raises(ValueError, match="malformed message"):
        CODEC.decode(b"\xc1")
    with pytest.raises(TypeError, match="not a registered message"):
        CODEC.encode(object())


def test_a_codec_decodes_arrays_as_tuples_when_asked() -> None:
    codec = MessageCodec([AbortRequest, ControlReply], use_list=False)
    reply = codec.decode(codec.encode(ControlReply(1, True, {"pages": [1, 2]})))
    assert reply.data == {"pages": (1, 2)}


def test_token_outputs_add_up_to_the_whole_answer() -> None:
    total = TokenOutput("r")
    total.add(TokenOutput("r", [1], "a", prompt_tokens=4, completion_tokens=1, logprobs=[-1.0]))
    total.add(TokenOutput("r", [], "", completion_tokens=1))  # a held-back character
    total.add(
        TokenOutput("r", [2, 3], "bc", True, "stop", 3, completion_tokens=3, logprobs=[-2, -3])
    )
    assert (total.token_ids, total.text, total.logprobs) == ([1, 2, 3], "abc", [-1.0, -2, -3])
    assert (total.prompt_tokens, total.completion_tokens) == (4, 3)
    assert total.finished and (total.finish_reason, total.matched_stop) == ("stop", 3)
