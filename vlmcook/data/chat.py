"""The released chat format (Qwen3's template, as shipped in MiniCPM-V 4.5's tokenizer_config.json) without Jinja.

Notable (docs/reference.md 8.2, 8.8):
- `render` returns exactly the text the released Jinja template renders for the same messages (tests compare the
  two over many message lists): optional system turn; user turns verbatim; assistant turns before the last user
  query lose their reasoning; an assistant turn after it gets a `<think>\\n...\\n</think>\\n\\n` block if it is the
  last message or has reasoning. `reasoning_content` wins over inline `<think>` tags, as in the template.
  The template's tool branches are kept for `role: tool` messages; `tools=` / `tool_calls` are not supported.
- Generation prompt: `<|im_start|>assistant\\n` + `<think>\\n\\n</think>\\n\\n` (thinking=False, an empty
  reasoning block so the model answers directly) or `<think>\\n` (thinking=True) or nothing more (None, the
  template's "enable_thinking undefined").
- Where the template silently renders nothing (an unknown role, non-string content), we raise.
- `render_pieces` is the same text cut at the template's own control tokens (CONTROL): the processor encodes
  those as tokens and everything else (message text, with the template's plain text around it) with
  `Tokenizer.encode_text`, so message text that spells `<|im_start|>` or `<think>` stays text (docs/reliability.md).
- `build_labels` (SFT): labels aligned with input_ids (not shifted; the loss shifts), -100 = ignored; every
  assistant turn is supervised from after `<|im_start|>assistant\\n` through its `<|im_end|>`; the last assistant
  turn's template-inserted empty think block (`<think>\\n\\n</think>\\n\\n`, 4 tokens) is not supervised.
"""

from __future__ import annotations

from typing import Any, Sequence

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# The tokens the template itself writes; in message text the same strings are plain characters.
CONTROL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_response>", "</tool_response>")


def _fields(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """Validate and return (role, content, reasoning_content) per message."""
    if not messages:
        raise ValueError("chat: no messages")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"chat: message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"chat: message {i} content must be a str here (got {type(content).__name__}); "
                             f"the processor turns content lists into text first")
        if m.get("tool_calls"):
            raise ValueError(f"chat: message {i} has tool_calls, which vlmcook's chat format does not render")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"chat: message {i} reasoning_content must be a str")
        out.append((role, content, reasoning))
    return out


def _last_query(msgs: list[tuple[str, str, str | None]]) -> int:
    """Index of the last user message that is not a wrapped tool response (len-1 if none)."""
    for i in range(len(msgs) - 1, -1, -1):
        role, content, _ = msgs[i]
        if role == "user" and not (content.startswith("<tool_response>") and content.endswith("</tool_response>")):
            return i
    return len(msgs) - 1


def split_think(content: str) -> tuple[str, str]:
    """The template's split of an assistant message with inline tags -> (reasoning, answer)."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


class _Control(str):
    """A control token the template writes (one of CONTROL), as opposed to text."""


IM_START, IM_END, THINK, END_THINK, TOOL_RESPONSE, END_TOOL_RESPONSE = map(_Control, CONTROL)


def _assistant(content: str, reasoning: str | None, with_think: bool, is_last: bool) -> list[str]:
    if reasoning is None:
        reasoning, content = split_think(content)
    if with_think and (is_last or reasoning):
        return [IM_START, "assistant\n", THINK, "\n" + reasoning.strip("\n") + "\n", END_THINK,
                "\n\n" + content.lstrip("\n")]
    return [IM_START, "assistant\n" + content]


def render_pieces(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                  thinking: bool | None = False) -> list[tuple[str, bool]]:
    """`render`'s text as (piece, is_control) pairs: each control token the template writes is its own piece;
    the text between two of them (message text and the template's plain text) is one piece."""
    msgs = _fields(messages)
    last_query, n = _last_query(msgs), len(msgs)
    parts: list[str] = []
    if msgs[0][0] == "system":
        parts += [IM_START, "system\n" + msgs[0][1], IM_END, "\n"]
    for i, (role, content, reasoning) in enumerate(msgs):
        if role == "user" or (role == "system" and i > 0):
            parts += [IM_START, f"{role}\n{content}", IM_END, "\n"]
        elif role == "assistant":
            parts += [*_assistant(content, reasoning, i > last_query, i == n - 1), IM_END, "\n"]
        elif role == "tool":
            if i == 0 or msgs[i - 1][0] != "tool":
                parts += [IM_START, "user"]
            parts += ["\n", TOOL_RESPONSE, f"\n{content}\n", END_TOOL_RESPONSE]
            if i == n - 1 or msgs[i + 1][0] != "tool":
                parts += [IM_END, "\n"]
    if add_generation_prompt:
        parts += [IM_START, "assistant\n"]
        if thinking is not None:
            parts += [THINK, "\n"] if thinking else [THINK, "\n\n", END_THINK, "\n\n"]
    pieces: list[tuple[str, bool]] = []
    for part in parts:
        if isinstance(part, _Control):
            pieces.append((str(part), True))
        elif pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + part, False)
        elif part:
            pieces.append((part, False))
    return pieces


def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
           thinking: bool | None = False) -> str:
    """Messages -> the prompt text of the released chat template."""
    return "".join(piece for piece, _ in render_pieces(messages, add_generation_prompt, thinking))


def build_labels(input_ids: Sequence[int], tokenizer) -> list[int]:
    """SFT labels for `input_ids` (aligned, not shifted): assistant tokens after each `<|im_start|>assistant\\n`
    through `<|im_end|>` keep their id, everything else is IGNORE_INDEX; the last assistant turn's empty think
    block is ignored too."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("build_labels takes one sequence of ids (1-D), not a batch")
    labels = [IGNORE_INDEX] * len(ids)
    empty_think = tokenizer.encode(EMPTY_THINK)
    spans = _assistant_spans(ids, tokenizer)
    for k, (start, end) in enumerate(spans):
        if k == len(spans) - 1 and ids[start:start + len(empty_think)] == empty_think:
            start += len(empty_think)
        labels[start:end] = ids[start:end]
    return labels


def _assistant_spans(ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """[start, end) of each assistant turn's body: from the token after the header `assistant\\n` through
    `<|im_end|>` inclusive (or the end of ids for an unfinished turn)."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] != tokenizer.im_start_id:
            i += 1
            continue
        j, header = i + 1, ""
        while j < len(ids) and "\n" not in header and ids[j] not in (tokenizer.im_start_id, tokenizer.im_end_id):
            header += tokenizer.decode([ids[j]])
            j += 1
        if header.startswith("assistant\n"):
            end = j
            while end < len(ids) and ids[end] != tokenizer.im_end_id:
                end += 1
            spans.append((j, min(end + 1, len(ids))))
            i = end
        else:
            i = j
    return spans
