"""`decdec chat`: the chat format a model's template asks for, turns over stdin, and the KV cache
carried from turn to turn."""

import io
import sys

import pytest
import yaml

from decdec import runtime
from decdec.runtime.chat import CHATML, GEMMA, LLAMA3, PLAIN, chat, chat_format
from decdec.runtime.cli import main
from tests.runtime.tiny_hf import CHATML as SMOL_TEMPLATE
from tests.runtime.tiny_hf import tiny_hf_cfg, tiny_hf_folder

GEMMA_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + role + '\n' }}{% endfor %}"
LLAMA3_TEMPLATE = "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}{% endfor %}"


def test_the_template_picks_the_format():
    fmt, origin = chat_format(SMOL_TEMPLATE, "llama")
    assert fmt.name == "ChatML" and origin == "the model's chat template"
    assert fmt.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chat_format(GEMMA_TEMPLATE, "gemma3")[0] == GEMMA
    assert GEMMA.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                         {"role": "user", "content": "?"}]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
        "<start_of_turn>user\n?<end_of_turn>\n<start_of_turn>model\n")
    assert chat_format(LLAMA3_TEMPLATE, "llama")[0] == LLAMA3
    assert chat_format("{{ messages }}", "llama")[0] is PLAIN
    assert chat_format(None, "gemma3") == (GEMMA, "no chat template in the model: the Gemma family's")
    assert chat_format(None, "qwen2")[0] is PLAIN
    assert CHATML.system is None  # the default system prompt comes from the template only


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("chat") / "model", ascii_only=True)


def test_chat_over_stdin(model_folder, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_hf_cfg(model_folder, tmp_path / "art")))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nHow are you?\n/exit\nnever read\n"))
    assert main(["chat", str(cfg), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and len(out) >= 2
    assert "chat format: ChatML (the model's chat template)" in err
    assert err.count(" tokens/s)") == 2  # two turns: the empty line and what follows /exit are none


def test_each_turn_prefills_only_what_the_cache_lacks(model_folder, tmp_path):
    engine = runtime.compile(tiny_hf_cfg(model_folder, tmp_path / "art"), progress=False)
    tok, fmt = engine.tokenizer, chat_format(SMOL_TEMPLATE, "llama")[0]
    prefilled, stepped, buf, replies, marks = [], [], [], [], []
    prefill, step = engine.prefill, engine.step
    engine.prefill = lambda ids: prefilled.append(list(ids)) or prefill(ids)
    engine.step = lambda token: stepped.append(token) or step(token)

    def info(text):  # the banner, then one line after each reply
        replies.append("".join(buf))
        buf.clear()
        marks.append(len(stepped))

    chat(engine, ["Hello", "More?"], buf.append, info, max_new_tokens=6)
    first = tok.encode(fmt.render([{"role": "user", "content": "Hello"}]))
    assert prefilled[0] == first
    out1 = stepped[:marks[1]]  # every generated token is stepped into the cache
    assert tok.decode(out1) + "\n" == replies[1]
    conversation = [{"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": tok.decode(out1, skip_special=False)},
                    {"role": "user", "content": "More?"}]
    both = tok.encode(fmt.render(conversation))
    assert both[:len(first) + len(out1)] == first + out1
    assert prefilled[1] == both[len(first) + len(out1):]  # only the new turn went through prefill
    # the second reply equals a replay of the whole conversation from an empty cache
    engine.prefill, engine.step = prefill, step
    engine.reset()
    end = tok.encode("<|im_end|>", add_bos=False)
    assert tok.decode(list(engine.tokens(both, 6, stop=end))) + "\n" == replies[2]
