"""`decdec chat`: a prompt loop over one conversation, in the model's chat format.

A GGUF (or tokenizer_config.json) carries its chat template as Jinja. jinja2 is not a dependency,
so the template is recognised by the turn markers it writes and rendered by a fixed formatter of that
format: ChatML (`<|im_start|>`: SmolLM2, Qwen2), Gemma (`<start_of_turn>`), Llama 3
(`<|start_header_id|>`). A default system prompt written literally in a ChatML template (SmolLM2's)
is kept. Without a template, Gemma 3 models get Gemma's turns (their vocabulary has the markers) and
other models a plain "user: / assistant:" transcript.

The KV cache holds the conversation so far: each turn prefills only the tokens after it (the whole
conversation again when its tokens do not start with what the cache holds).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from decdec.errors import ConfigError
from decdec.runtime.engine import Engine, text_pieces


@dataclass(frozen=True)
class ChatFormat:
    name: str
    turn: str  # one message, with {role} and {content}
    reply: str  # opens the assistant's turn
    end: str  # closes a turn: generation stops at it
    system: str | None = None  # a default system message
    roles: dict = field(default_factory=dict)  # role names the format spells otherwise

    def render(self, messages: list[dict]) -> str:
        """The conversation, ending with the opening of the assistant's reply."""
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        turns = (self.turn.format(role=self.roles.get(m["role"], m["role"]), content=m["content"]) for m in messages)
        return "".join(turns) + self.reply


CHATML = ChatFormat("ChatML", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>")
GEMMA = ChatFormat("Gemma", "<start_of_turn>{role}\n{content}<end_of_turn>\n", "<start_of_turn>model\n",
                   "<end_of_turn>", roles={"assistant": "model", "system": "user"})
LLAMA3 = ChatFormat("Llama 3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
PLAIN = ChatFormat("plain", "{role}: {content}\n", "assistant:", "\n")
MARKERS = (("<|im_start|>", CHATML), ("<start_of_turn>", GEMMA), ("<|start_header_id|>", LLAMA3))


def chat_format(template: str | None, family: str) -> tuple[ChatFormat, str]:
    """The format to render turns in, and where it comes from (for the banner)."""
    for marker, fmt in MARKERS:
        if template and marker in template:
            system = re.search(r"<\|im_start\|>system\n([^{}'\"]+?)<\|im_end\|>", template) if fmt is CHATML else None
            return dataclasses.replace(fmt, system=system and system.group(1)), "the model's chat template"
    if template:
        return PLAIN, "the model's chat template is of an unknown kind"
    if family == "gemma3":
        return GEMMA, "no chat template in the model: the Gemma family's"
    return PLAIN, "no chat template in the model"


def chat(engine: Engine, lines: Iterable[str], write: Callable[[str], None], info: Callable[[str], None],
         max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """Answer each line of `lines` as a user turn, streaming the reply through `write`.
    `/reset` starts a new conversation, `/exit` ends."""
    tok = engine.tokenizer
    if tok is None:
        raise ConfigError("`decdec chat` needs a model with a tokenizer (this one is synthetic)")
    fmt, origin = chat_format(tok.chat_template, engine.prepared.model.args.family)
    end = tok.encode(fmt.end, add_bos=False)
    info(f"chat format: {fmt.name} ({origin}); /reset starts over, /exit or Ctrl-D ends")
    messages: list[dict] = []
    fed: list[int] = []  # the tokens in the KV cache
    for line in lines:
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset" or not messages:
            messages, fed = [], []
            engine.reset()
        if not text or text == "/reset":
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.encode(fmt.render(messages))
        if len(ids) >= engine.max_seq_len and len(messages) > 1:
            info(f"the conversation no longer fits model.max_seq_len = {engine.max_seq_len} tokens: starting a new one")
            messages, fed = messages[-1:], []
            ids = tok.encode(fmt.render(messages))
        if ids[:len(fed)] != fed:  # the reply re-tokenised otherwise: replay the conversation
            engine.reset()
            fed = []
        start, out = time.perf_counter(), []
        stream = engine.tokens(ids[len(fed):], max_new_tokens, temperature, stop=end[:1] if len(end) == 1 else ())
        for piece in text_pieces(tok, stream, out):
            write(piece)
        write("\n")
        seconds = time.perf_counter() - start
        info(f"({len(out)} tokens, {len(out) / seconds:.1f} tokens/s)")
        fed = ids + out
        # the reply as generated, control tokens included, so that the next turn's tokens start with the cache's
        messages.append({"role": "assistant", "content": tok.decode(out, skip_special=False)})
