"""Moving a stream between nodes, as the gateway and the nodes speak it (pdserve's own PD fields).

To be able to move a stream, the gateway must know which tokens the client has already seen.
It asks the decode node for them with `"pd_token_ids": true` in the body; the node then puts the
ids each event added in an SSE comment line before the event, which clients ignore and the
gateway strips:

    :ids 5,17
    data: {"choices": [{"text": " hello", ...}], ...}

(`:ids 9 end` on the event that finishes the request; `:ids ` with no ids on the usage tail.)
When the node fails mid-stream, the gateway sends the same request to another pair with
`"pd_resume_ids": [...]`, every id streamed so far: the nodes compute them as prompt, count them
as output (max_tokens, penalties, the seeded position, stop strings, usage), and the stream goes
on where the client's text stopped.

SGLang's /generate events hold the whole output so far, logprobs too. With `return_logprob`, the
gateway also sends `"pd_resume_logprobs"`: the logprob fields of the last event the client got
(`input_token_logprobs`, `input_top_logprobs`, `output_token_logprobs`, `output_top_logprobs`;
one output entry per resumed id). The new node puts them in its events as they were, before the
logprobs of what it generates, so the client's arrays go on without a gap. Without them (a
client of the node itself), the resumed ids' entries carry a null logprob.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import invalid_request

TOKEN_IDS = "pd_token_ids"  # body: tag each event with its token ids
RESUME_IDS = "pd_resume_ids"  # body: the output already streamed (ids), to go on from
RESUME_LOGPROBS = "pd_resume_logprobs"  # body: /generate's logprob fields the client was sent
INPUT_LOGPROB_FIELDS = ("input_token_logprobs", "input_top_logprobs")
OUTPUT_LOGPROB_FIELDS = ("output_token_logprobs", "output_top_logprobs")
IDS_LINE = re.compile(rb"^:ids ([0-9,]*)( end)?\n", re.M)


def ids_comment(ids: Sequence[int], finished: bool = False) -> bytes:
    """The comment line that tags the next event."""
    end = b" end" if finished else b""
    return b":ids " + ",".join(map(str, ids)).encode() + end + b"\n"


def wants_token_ids(body: dict[str, Any]) -> bool:
    return body.get(TOKEN_IDS) is True


def resume_ids(body: dict[str, Any]) -> list[int]:
    """The ids to resume after (empty: a fresh request); a 400 unless a list of token ids."""
    value = body.get(RESUME_IDS)
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
        raise invalid_request(f"{RESUME_IDS} must be a list of token ids", param=RESUME_IDS)
    return value


def resume_logprobs(body: dict[str, Any], resumed: int) -> dict[str, list]:
    """The logprob fields to go on from (empty: none sent); a 400 unless each is a list, and
    the output ones hold one entry per resumed id (or none: none were asked)."""
    value = body.get(RESUME_LOGPROBS)
    if value is None:
        return {}
    known = (*INPUT_LOGPROB_FIELDS, *OUTPUT_LOGPROB_FIELDS)
    if not isinstance(value, dict) or not set(value) <= set(known):
        raise invalid_request(
            f"{RESUME_LOGPROBS} must be an object of {', '.join(known)}", param=RESUME_LOGPROBS
        )
    for name, entries in value.items():
        if not isinstance(entries, list):
            raise invalid_request(f"{RESUME_LOGPROBS}.{name} must be a list", param=RESUME_LOGPROBS)
        if name in OUTPUT_LOGPROB_FIELDS and len(entries) not in (0, resumed):
            raise invalid_request(
                f"{RESUME_LOGPROBS}.{name} must hold one entry per id of {RESUME_IDS} "
                f"({resumed}) or none, not {len(entries)}",
                param=RESUME_LOGPROBS,
            )
    return value
