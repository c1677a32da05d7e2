"""Greedy answers for a list of prompts, through the inference engine (batched, left-padded, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from vlmcook.data.processor import collate
from vlmcook.infer.engine import Engine, SamplingParams


def prompt_of(processor, messages: list[dict], images=None, thinking: bool = False) -> dict:
    """Processor inputs for everything before the final assistant turn, ending in the generation prompt
    (thinking=False: the same empty think block the short-mode training samples carry; True: an open one)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return processor(messages, images, thinking=thinking, add_generation_prompt=True)


@dataclass(frozen=True)
class LazyPrompt:
    """A prompt built only when its batch runs (a video's pixels cost MBs: hundreds held at once cost GBs)."""

    length: int  # its tokens, known from headers (Processor.count_tokens)
    build: Callable[[], dict]


@torch.no_grad()
def greedy(model, tokenizer, prompts: Sequence[dict | LazyPrompt], max_new_tokens: int, batch_size: int = 8
           ) -> list[str]:
    """Decode every prompt greedily; prompts of similar length are batched together (less padding)."""
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    length = [p.length if isinstance(p, LazyPrompt) else p["input_ids"].shape[1] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: length[i])
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate([prompts[i].build() if isinstance(prompts[i], LazyPrompt) else prompts[i] for i in idx],
                            tokenizer.pad_id, padding_side="left")
            for i, g in zip(idx, engine.generate(batch, params)):
                out[i] = tokenizer.decode(g.token_ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out
