"""The OpenAI request bodies the server accepts, checked by pydantic, and its JSON errors.

Types are strict (``"5"`` is not a number, ``true`` is not an integer, NaN is not a
temperature); unknown fields are ignored, as OpenAI-compatible servers do. Every
rejection is an ``APIError`` whose body names the offending field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
MAX_STOPS = 16  # OpenAI allows 4; editors send more


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _Request(BaseModel):
    """The fields both endpoints take."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    logprobs: bool | int | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"'stop' has {len(stops)} strings; give at most {MAX_STOPS}", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "'stop' has an empty string: remove it", "stop")
        return stops

    def check_unsupported(self) -> None:
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "'logprobs' is not supported by this server: leave it out", "logprobs")


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise APIError(400, "'tools' is not supported by this server: leave it out", "tools")


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]

    def prompt_input(self) -> str | list[int]:
        """A string or token ids; a list of strings must hold exactly one."""
        p = self.prompt
        if isinstance(p, list) and (not p or isinstance(p[0], str)):
            if len(p) != 1:
                raise APIError(400, f"'prompt' is a list of {len(p)} strings; this server takes one prompt per request",
                               "prompt")
            p = p[0]
        if len(p) == 0:
            raise APIError(400, "'prompt' is empty: give some text or token ids", "prompt")
        return p


_FIELDS = set().union(*(m.model_fields for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)))


def _param(loc: tuple) -> str | None:
    """'messages[0].content' from pydantic's location, cut where a union's member name starts."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
        else:
            break
    return out or None


def parse(cls: type[_Request], raw: bytes) -> _Request:
    """The request body as ``cls``, or an ``APIError`` naming the first bad field."""
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {errors[0]['msg']}") from None
        if errors[0]["loc"] == ():
            raise APIError(400, "the body must be a JSON object") from None
        param = _param(errors[0]["loc"])
        msgs = dict.fromkeys(err["msg"] for err in errors if _param(err["loc"]) == param)
        raise APIError(400, f"invalid '{param}': {' or '.join(msgs)}", param) from None
    req.check_unsupported()
    return req
