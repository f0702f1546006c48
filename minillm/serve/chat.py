"""Chat messages → one prompt, the way the model was trained to read them.

A language model continues text; a chat is a list of messages. A *template* turns the messages into
the text the model knows how to continue, and says where the answer ends:

    a model that ships its own chat template (an instruct GGUF file, a Hugging Face instruct folder):
        that template, rendered as transformers' apply_chat_template does
        (minillm/data/chat_template.py); the answer ends at its end-of-turn token
    instruction-tuned model (minillm finetune --task=instruct; its config has "instruct"):
        the last user message is the instruction, earlier messages (system included) are the Input
        section, in the model's own training template (finetune/instruct.py); the answer ends at
        the end marker it was trained to write
    base model (no template of its own):
        "System: …\n\nUser: …\nAssistant: …\nUser: …\nAssistant:" and the answer ends where the model
        starts a new "\nUser:" turn by itself

Roles are OpenAI's: system (and developer, its newer name), user, assistant. Anything else is a 400.
"""

from __future__ import annotations

from minillm.data.chat_template import chat_prompt_for

ROLES = ("system", "developer", "user", "assistant")
PLAIN_STOP = "\nUser:"


def chat_prompt(messages: list[dict], instruct: dict | None, tokenizer=None) -> tuple[str, list[str]]:
    """(prompt text, stop strings) for `messages`, each {"role", "content"}; ValueError on a bad list.

    tokenizer: the model's; when it carries a chat template, that template formats the messages."""
    if not messages:
        raise ValueError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role is {m['role']!r}; use one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's: the model answers it")
    if getattr(tokenizer, "chat_template", None):
        # "developer" is OpenAI's newer name for the system role; templates know "system"
        turns = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                 for m in messages]
        return chat_prompt_for(tokenizer, turns)  # ChatTemplateError (a ValueError) -> 400
    if instruct:
        from minillm.finetune.instruct import format_prompt

        *history, last = messages
        context = "\n".join(f"{_speaker(m['role'])}: {m['content']}" for m in history)
        return format_prompt(last["content"], context, instruct["template"]), [instruct["end"]]
    lines = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            lines.append(f"System: {m['content']}\n")
        else:
            lines.append(f"{_speaker(m['role'])}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:", [PLAIN_STOP]


def _speaker(role: str) -> str:
    return {"user": "User", "assistant": "Assistant"}.get(role, "System")
