"""The node's /tokenize and /detokenize (vLLM's; api/tokenize.py has the bodies): the ids a
prompt or a chat encodes to here, exactly as the generation routes encode them, and ids back
to text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError, invalid_request
from api.http import error_response, parse_json, read_body, request_id
from api.openai import check_model, parse_request
from api.tokenize import (
    Detokenize,
    DetokenizeResponse,
    TokenizeChat,
    TokenizePrompt,
    TokenizeResponse,
)
from node.context import MAX_BODY_BYTES, NodeContext


class Tokenizing:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def tokenize(self, request: Request) -> Response:
        return await self._answer(request, self._tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._answer(request, self._detokenize)

    async def _answer(
        self, request: Request, work: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Response:
        rid = request_id(request.headers)
        try:
            body = parse_json(await read_body(request, MAX_BODY_BYTES))
            return JSONResponse(work(body), headers={"X-Request-Id": rid})
        except ApiError as err:
            return error_response(err, rid)

    def _check_model(self, model: str | None) -> None:
        if model is not None:
            check_model(model, {self.ctx.model_name}, "this node")

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        tokenizer = self.ctx.tokenizer
        if "messages" in body:
            chat = parse_request(TokenizeChat, body)
            self._check_model(chat.model)
            if chat.add_special_tokens:
                raise invalid_request(
                    "add_special_tokens cannot be true for a chat (its template writes the "
                    "special tokens)",
                    param="add_special_tokens",
                )
            options = chat.template_options()
            ids = self.ctx.encode_chat(chat.chat_messages(), chat.template_tools(), options)
            strs = chat.return_token_strs
        else:
            req = parse_request(TokenizePrompt, body)
            self._check_model(req.model)
            ids = list(
                tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
            )
            strs = req.return_token_strs
        answer = TokenizeResponse(
            count=len(ids),
            max_model_len=self.ctx.max_model_len,
            tokens=ids,
            token_strs=list(tokenizer.convert_ids_to_tokens(ids)) if strs else None,
        )
        return answer.model_dump()

    def _detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        req = parse_request(Detokenize, body)
        self._check_model(req.model)
        vocab = len(self.ctx.tokenizer)
        outside = [t for t in req.tokens if t >= vocab]
        if outside:
            raise invalid_request(
                f"token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})",
                param="tokens",
            )
        return DetokenizeResponse(prompt=self.ctx.tokenizer.decode(req.tokens)).model_dump()
