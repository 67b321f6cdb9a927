"""Stand-ins for the exo 1.x modules ``exo_medusa_mlx.exo1`` imports, with exo's field names.

exo 1.x needs Python 3.13 and its Rust bindings, so the tests install these under
exo's module paths (``install()``) instead. Keyword-only dataclasses: a field name
exo lacks is a TypeError here, as it is a validation error in exo's pydantic models.
Names and shapes are exo's (b5375f8); the code is ours.
"""

from __future__ import annotations

import sys
import types
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal


class Id(str):
    def __new__(cls, value: str | None = None):
        return super().__new__(cls, value or str(uuid.uuid4()))


class TaskId(Id):
    pass


class CommandId(Id):
    pass


CANCEL_ALL_TASKS = TaskId("CANCEL_ALL_TASKS")


@dataclass(kw_only=True, frozen=True)
class InputMessage:
    role: Literal["user", "assistant", "system", "developer", "tool"]
    content: str


@dataclass(kw_only=True, frozen=True)
class TextGenerationTaskParams:
    model: str
    input: list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list | None = None
    bench: bool = False
    use_prefix_cache: bool = False
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    chat_template_messages: list | None = None
    reasoning_effort: str | None = None
    enable_thinking: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(kw_only=True)
class TextGeneration:
    instance_id: str
    command_id: CommandId
    task_params: TextGenerationTaskParams
    task_id: TaskId = field(default_factory=TaskId)
    task_status: str = "Pending"
    error_type: str | None = None
    error_message: str | None = None


@dataclass(kw_only=True)
class PromptTokensDetails:
    cached_tokens: int = 0
    audio_tokens: int = 0


@dataclass(kw_only=True)
class CompletionTokensDetails:
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


@dataclass(kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


@dataclass(kw_only=True, frozen=True)
class Memory:
    in_bytes: int = 0

    @classmethod
    def from_gb(cls, val: float) -> "Memory":
        return cls(in_bytes=round(val * 1024**3))


@dataclass(kw_only=True)
class GenerationStats:
    prompt_tps: float
    generation_tps: float
    prompt_tokens: int
    generation_tokens: int
    peak_memory_usage: Memory
    prefix_cache_hit: Literal["none", "partial", "exact"] = "none"


@dataclass(kw_only=True)
class TokenChunk:
    model: str
    text: str
    token_id: int
    usage: Usage | None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    stats: GenerationStats | None = None
    logprob: float | None = None
    top_logprobs: list | None = None
    is_thinking: bool = False


@dataclass(kw_only=True)
class ErrorChunk:
    model: str
    error_message: str
    finish_reason: Literal["error"] = "error"
    diagnostics: list = field(default_factory=list)


@dataclass(kw_only=True)
class ChunkGenerated:
    command_id: CommandId
    chunk: Any


@dataclass(kw_only=True)
class FinishedResponse:
    pass


@dataclass(kw_only=True)
class CancelledResponse:
    pass


@dataclass(kw_only=True)
class ModelLoadingResponse:
    layers_loaded: int
    total: int


class Engine(ABC):
    _cancelled_tasks: set[TaskId]

    def should_cancel(self, task_id: TaskId) -> bool:
        return task_id in self._cancelled_tasks or CANCEL_ALL_TASKS in self._cancelled_tasks

    @abstractmethod
    def warmup(self) -> None: ...

    @abstractmethod
    def submit(self, task) -> None: ...

    @abstractmethod
    def step(self): ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def serve_prefill(self, request, wfile) -> None: ...


class Builder(ABC):
    @abstractmethod
    def connect(self, bound_instance) -> None: ...

    @abstractmethod
    def load(self, bound_instance): ...

    @abstractmethod
    def build(self) -> Engine: ...

    @abstractmethod
    def close(self) -> None: ...


MAX_TOKENS = 32168


def apply_chat_template(tokenizer, task_params: TextGenerationTaskParams) -> str:
    """exo's signature; the tiny tokenizers have no template: the messages' contents, joined."""
    parts = ([task_params.instructions] if task_params.instructions else []) + [m.content for m in task_params.input]
    return " ".join(parts)


_MODULES = {
    "exo.api.types": ["CompletionTokensDetails", "GenerationStats", "PromptTokensDetails", "Usage"],
    "exo.shared.types.chunks": ["ErrorChunk", "TokenChunk"],
    "exo.shared.types.events": ["ChunkGenerated"],
    "exo.shared.types.memory": ["Memory"],
    "exo.shared.types.tasks": ["CANCEL_ALL_TASKS", "TaskId", "TextGeneration"],
    "exo.shared.types.text_generation": ["InputMessage", "TextGenerationTaskParams"],
    "exo.shared.types.worker.runner_response": ["CancelledResponse", "FinishedResponse", "ModelLoadingResponse"],
    "exo.worker.engines.base": ["Builder", "Engine"],
    "exo.worker.engines.mlx.constants": ["MAX_TOKENS"],
    "exo.worker.engines.mlx.utils_mlx": ["apply_chat_template"],
}


def install() -> None:
    """Put the stand-ins in ``sys.modules`` under exo's paths (parents included)."""
    here = sys.modules[__name__]
    for path, names in _MODULES.items():
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for name in names:
            setattr(sys.modules[path], name, getattr(here, name))


class Receiver:
    """exo's ``MpReceiver`` as the engine uses it: ``collect()`` what has arrived."""

    def __init__(self):
        self.items: list = []

    def collect(self) -> list:
        out, self.items = self.items, []
        return out


class Sender:
    def __init__(self):
        self.sent: list = []

    def send(self, item) -> None:
        self.sent.append(item)
