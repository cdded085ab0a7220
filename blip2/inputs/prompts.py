"""Task presets and prompt templates: captions, questions (the paper's VQA prompts) and chat turns."""

from __future__ import annotations

from collections.abc import Sequence

# Generation settings of each task, as the paper ran them (GenerationConfig fields).
CAPTION = dict(num_beams=5, max_new_tokens=30)
VQA = dict(num_beams=5, max_new_tokens=10, length_penalty=-1.0)
CHAT = dict(num_beams=5, max_new_tokens=30)
VQA_PROMPT = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}


def render_chat(messages: Sequence[dict]) -> str:
    """Messages to BLIP-2's prompt: "Question: {user} Answer: {assistant} ... Question: {user} Answer:"."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {_short(messages)} "
                         "(for a single question, use ask())")
    if not messages:
        raise ValueError("chat needs at least one message")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {_short(m)}")
        role, content = m.get("role"), m.get("content", "")
        if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise ValueError(f"messages[{i}].content parts must be dicts like {{'type': 'text', 'text': ...}}")
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {_short(content)}")
        content = content.strip()
        if role == "user":
            parts.append(f"Question: {content}")
        elif role == "assistant":
            parts.append(f"Answer: {content}")
        elif role == "system":
            parts.append(content)
        else:
            raise ValueError(f"unknown chat role {role!r} in messages[{i}] (use user, assistant or system)")
    if messages[-1].get("role") != "user":
        raise ValueError("the last chat message must be the user's")
    return " ".join(p for p in parts if p) + " Answer:"


def check_prompts(prompts, what: str) -> list[str]:
    """One prompt or a list of them, each a string, as a list."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {_short(prompts)}")
    return list(items)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
