"""The OpenAI-compatible HTTP API (Starlette): chat and text completions, models, health.

Requests are read (size-limited), authorised, validated and tokenised on the event
loop, so bad input is answered at once and never waits in the queue; only good
requests reach the ``Scheduler``. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cli_args import NON_NEGATIVE, POSITIVE_INT, PROBABILITY, check_fields
from ..core.tokens import chat_ids, encode_prompt
from .responses import DONE, Shape, sse
from .scheduler import GenerationArgs, Job, Scheduler
from .schema import APIError, ChatRequest, CompletionRequest, parse

@dataclass
class Settings:
    model_id: str  # the name /v1/models lists and requests may give
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_tokens: int = 512  # when a request gives none (mlx_lm.server's default)
    temp: float = 0.0
    top_p: float = 1.0
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The rules of the server's flags of the same names (``mlx_medusa server --max-tokens ...``).
        check_fields(self, dict(max_body_bytes=POSITIVE_INT, max_tokens=POSITIVE_INT, temp=NON_NEGATIVE,
                                top_p=PROBABILITY))


def model_limits(model) -> tuple[int | None, int]:
    """(context length or None, vocabulary size) from the base model's config (MLX args or HF config)."""
    cfg = getattr(model.base, "args", None) or model.base.config
    return getattr(cfg, "max_position_embeddings", None), cfg.vocab_size


class API:
    def __init__(self, scheduler: Scheduler, settings: Settings):
        self.scheduler, self.settings = scheduler, settings
        self.context, self.vocab = model_limits(scheduler.model)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["name"]
        if name != self.settings.model_id:
            raise APIError(404, f"model '{name}' is not served here: use '{self.settings.model_id}'", "model",
                           "model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "mlx_medusa"}

    async def chat(self, request: Request) -> Response:
        req = parse(ChatRequest, await self._body(request))
        tokenizer = self.scheduler.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template: send a 'prompt' to /v1/completions", "messages")
        from jinja2 import TemplateError

        try:  # off the event loop: a long conversation takes a while to tokenise
            ids = await asyncio.to_thread(chat_ids, tokenizer, [m.as_template_input() for m in req.messages])
        except (TemplateError, ValueError) as e:
            raise APIError(400, f"the chat template rejected 'messages': {e}", "messages") from None
        limit = ("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None \
            else ("max_tokens", req.max_tokens)
        return await self._serve(request, req, ids, "messages", limit, Shape(True, self.settings.model_id))

    async def completions(self, request: Request) -> Response:
        req = parse(CompletionRequest, await self._body(request))
        prompt = req.prompt_input()
        if isinstance(prompt, list) and not all(0 <= t < self.vocab for t in prompt):
            raise APIError(400, f"'prompt' has token ids outside 0..{self.vocab - 1}", "prompt")
        ids = (await asyncio.to_thread(encode_prompt, self.scheduler.tokenizer, prompt)).tolist()
        shape = Shape(False, self.settings.model_id)
        return await self._serve(request, req, ids, "prompt", ("max_tokens", req.max_tokens), shape)

    async def _serve(self, request: Request, req, ids: list[int], prompt_field: str, limit: tuple, shape: Shape):
        if req.model is not None and req.model not in (self.settings.model_id, "default_model"):
            raise APIError(404, f"model '{req.model}' is not served here: use '{self.settings.model_id}'",
                           "model", "model_not_found")
        s = self.settings
        args = GenerationArgs(ids, self._max_tokens(len(ids), prompt_field, *limit),
                              s.temp if req.temperature is None else req.temperature,
                              s.top_p if req.top_p is None else req.top_p, req.seed, req.stops())
        job = self.scheduler.submit(args)
        if req.stream:
            shape.include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(self._events(job, shape), job)
        return await self._whole(request, job, shape)

    def _max_tokens(self, n_prompt: int, prompt_field: str, name: str, value: int | None) -> int:
        """The request's limit, checked against the room the context leaves; the default fits it."""
        if self.context is None:
            return value if value is not None else self.settings.max_tokens
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens, the model's context is {self.context}: "
                                f"shorten '{prompt_field}'", prompt_field, "context_length_exceeded")
        if value is None:
            return min(self.settings.max_tokens, room)
        if value > room:
            raise APIError(400, f"'{name}' is {value}, but after the {n_prompt}-token prompt only {room} tokens "
                                f"fit in the model's {self.context}-token context", name, "context_length_exceeded")
        return value

    async def _whole(self, request: Request, job: Job, shape: Shape) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        text, last = "", None
        try:
            async for last in job.stream():
                text += last.text
        except APIError:
            raise
        except Exception as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            watcher.cancel()
            job.cancel()  # no-op once finished; stops the job if this handler is cancelled
        if last is None or not last.finish_reason:
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(shape.whole(text, last))

    async def _events(self, job: Job, shape: Shape):
        try:
            if shape.chat:
                yield sse(shape.chunk("", first=True))
            async for d in job.stream():
                if d.text:
                    yield sse(shape.chunk(d.text))
                if d.finish_reason:
                    yield sse(shape.chunk("", last=d))
                    if shape.include_usage:
                        yield sse(shape.usage_chunk(d))
            yield DONE
        except Exception as e:  # headers are sent: the error goes in the stream, as OpenAI's does
            error = e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", type="server_error")
            yield sse(error.body())

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        self._authorize(request)
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)


class _JobStream(StreamingResponse):
    """A job's server-sent events; however the response ends (a client that left cancels it), so does the job."""

    def __init__(self, events, job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _api_error(request: Request, e: APIError) -> Response:
    return JSONResponse(e.body(), e.status, headers=e.headers)


async def _http_error(request: Request, e: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    body = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).body()
    return JSONResponse(body, e.status_code, headers=e.headers)


async def _internal_error(request: Request, e: Exception) -> Response:
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), 500)


def create_app(scheduler: Scheduler, settings: Settings) -> Starlette:
    api = API(scheduler, settings)
    routes = [
        Route("/health", api.health),
        Route("/v1/models", api.models),
        Route("/v1/models/{name:path}", api.model),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                             allow_headers=["*"])] if settings.allowed_origins else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                         Exception: _internal_error})
