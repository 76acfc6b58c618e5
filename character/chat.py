"""Talking to a checkpoint: open any checkpoint as a sampling client, and hold a conversation with it.

A checkpoint is named the way users have them: a local adapter folder (trained, merged or downloaded),
a folded model folder, a `tinker://` sampler or training checkpoint, `tiny`, or `base` (the base model
of the configured backend). Everything here is the core; the CLI (`character chat`, `character sample`)
only wires terminals to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tinker import types

from character.backend import SamplingClient
from character.errors import UserError
from character.settings import Settings, Workspace
from character.storage import checkpoint_folder, uri_to_path
from character.train.families import renderer_for
from character.train.renderer import Messages, Renderer

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "leave"}


def check_checkpoint(checkpoint: str, settings: Settings) -> None:
    """What can be checked with no model loaded and no network: the key for Tinker, the folder locally."""
    if _on_tinker(checkpoint, settings):
        from character.backend.tinker import NO_KEY, api_key_source

        if api_key_source(settings) is None:
            raise UserError(NO_KEY)
        if checkpoint.startswith("tinker://"):
            try:
                types.ParsedCheckpointTinkerPath.from_tinker_path(checkpoint)
            except ValueError:
                raise UserError(
                    f"{checkpoint!r}: not a Tinker checkpoint path "
                    "(tinker://<run>/sampler_weights/<name> or .../weights/<name>)"
                ) from None
        return
    if checkpoint in ("base", "tiny"):
        return
    checkpoint_folder(checkpoint)


def _on_tinker(checkpoint: str, settings: Settings) -> bool:
    return checkpoint.startswith("tinker://") or (checkpoint == "base" and settings.backend == "tinker")


def open_checkpoint(checkpoint: str, settings: Settings, service=None) -> SamplingClient:
    """A sampling client (sample, compute_logprobs, get_tokenizer) on `checkpoint`.

    `service` replaces the backend's service (tests pass a fake); by default a TinkerService for
    Tinker checkpoints, a LocalService for local ones."""
    check_checkpoint(checkpoint, settings)
    if _on_tinker(checkpoint, settings):
        if service is None:
            from character.backend.tinker import TinkerService

            service = TinkerService(settings)
        if checkpoint == "base":
            return service.create_sampling_client(base_model=settings.tinker_base_model)
        return service.create_sampling_client(model_path=checkpoint)
    if service is None:
        from character.backend.local import LocalService

        service = LocalService(Workspace(settings.workdir), device=settings.device, seed=settings.seed)
    if checkpoint in ("base", "tiny"):
        return service.create_sampling_client(base_model=settings.base_model if checkpoint == "base" else "tiny")
    return service.create_sampling_client(model_path=str(Path(uri_to_path(checkpoint)).resolve()))


@dataclass
class Conversation:
    """One conversation with a model: messages kept between turns, an optional system prompt."""

    client: SamplingClient
    system: str | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    model: str | None = None  # the base model's name, for its family's renderer (else the tokenizer's own)
    messages: Messages = field(default_factory=list)
    _renderer: Renderer | None = None
    _turn: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, not {self.temperature:g}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, not {self.max_new_tokens}")
        self.reset()

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = renderer_for(self.client.get_tokenizer(), self.model)
        return self._renderer

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _params(self, seed: int) -> types.SamplingParams:
        return self.renderer.sampling_params(
            max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed
        )

    def _answers(self, messages: Messages, n: int, seed: int) -> list[str]:
        prompt = types.ModelInput.from_ints(self.renderer.prompt(messages))
        out = self.client.sample(prompt, n, self._params(seed)).result()
        return [self.renderer.decode(list(s.tokens)) for s in out.sequences]

    def say(self, text: str) -> str:
        """The model's answer to `text`; both become part of the conversation."""
        self._turn += 1
        answer = self._answers(self.messages + [{"role": "user", "content": text}], 1, self.seed + self._turn)[0]
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def sample(self, prompt: str, n: int) -> list[str]:
        """`n` independent answers to one prompt, outside the conversation."""
        if n < 1:
            raise UserError(f"-n must be at least 1, not {n}")
        return self._answers(self.messages + [{"role": "user", "content": prompt}], n, self.seed)


def run_script(
    conversation: Conversation,
    lines: Iterable[str],
    write: Callable[[str], None],
    prompt: Callable[[], None] | None = None,
) -> int:
    """Feed each line to the conversation and write each answer; `/reset` and `/exit` are commands.
    Returns the number of answers given."""
    answers = 0
    if prompt:
        prompt()
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            conversation.reset()
            write("(conversation reset)")
        elif text.startswith("/"):
            write(
                f"unknown command {text.split()[0]}; commands: " + ", ".join(f"{k} ({v})" for k, v in COMMANDS.items())
            )
        elif text:
            write(conversation.say(text))
            answers += 1
        if prompt:
            prompt()
    return answers
