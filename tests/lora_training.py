"""Local training clients on the tiny model whose every LoRA weight has a gradient, and rendered DPO batches
for them: what the micro-batching and fast-path equivalence tests compare two clients on."""

from __future__ import annotations

from typing import Callable

import torch
from tinker import types

from character.backend.local import LocalService
from character.settings import Workspace
from character.train.renderer import Renderer, to_datum


def lora_client(workdir, training: dict | None = None, **service_kw):
    """A rank-4 training client on "tiny" (a `LocalService(**service_kw)` on the CPU, `training` passed to
    `create_lora_training_client`). LoRA B starts at zero; it is set to the same seeded random values every
    time, so two clients start on identical weights and every LoRA weight has a gradient."""
    svc = LocalService(Workspace(workdir), device="cpu", seed=0, **service_kw)
    client = svc.create_lora_training_client("tiny", rank=4, seed=0, **(training or {}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in client.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return client


def rendered_pairs(client, n: int, texts: Callable[[int], tuple[str, str, str]]) -> list[types.Datum]:
    """`n` DPO pairs rendered to train on the answer, chosen then rejected: `texts(i)` is pair i's
    (question, chosen, rejected)."""
    r = Renderer(client.get_tokenizer())
    data = []
    for i in range(n):
        question, *answers = texts(i)
        q = [{"role": "user", "content": question}]
        for answer in answers:
            data.append(
                to_datum(*r.training_tokens(q + [{"role": "assistant", "content": answer}], train_on="last_assistant"))
            )
    return data


def random_reference_logprobs(data: list[types.Datum]) -> list[list[float]]:
    """Seeded reference log-probs in (-3, 0], one per input token of each datum."""
    gen = torch.Generator().manual_seed(2)
    return [(-torch.rand(len(d.model_input.to_ints()), generator=gen) * 3).tolist() for d in data]
