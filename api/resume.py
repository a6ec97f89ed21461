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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import invalid_request

TOKEN_IDS = "pd_token_ids"  # body: tag each event with its token ids
RESUME_IDS = "pd_resume_ids"  # body: the output already streamed (ids), to go on from
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
