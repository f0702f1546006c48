"""Chat templates rendered as transformers renders them, and bounded when a template misbehaves.

The templates below are data in the shape real models ship them (ChatML as in SmolLM2's GGUF, a
Llama-3-style header template, a Gemma-style template that refuses a system role, a Qwen2-style
template with tools and tojson, one with loop controls and a namespace). For each, a few hundred
generated conversations are rendered by minillm and by transformers' `apply_chat_template`, and
the strings must be equal (or both refuse).
"""

import random

import pytest

from minillm.data.chat_template import ChatTemplateError, render_chat, template_from_hf_folder
from tests.helpers import SMOLLM2_TEMPLATE

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SMOLLM2 = SMOLLM2_TEMPLATE
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QWEN2 = ("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
         "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen.' }}\n    {%- endif %}\n"
         "    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
         "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n"
         "    {%- if messages[0]['role'] == 'system' %}\n"
         "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
         "        {{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
         "{%- for message in messages %}\n    {%- if not (message.role == \"system\" and loop.first) %}\n"
         "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
         "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
         "{%- endif %}\n")
LOOPS = ("{% set ns = namespace(turns=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
         "{% set ns.turns = ns.turns + 1 %}{% if ns.turns > 3 %}{% break %}{% endif %}"
         "[{{ ns.turns }}|{{ m.role | upper }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
         "{{ eos_token if not add_generation_prompt else '' }}")
TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "gemma": GEMMA, "qwen2": QWEN2, "loops": LOOPS}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Météo für a city ☀",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TEXTS = ["Hi!", "What is the capital of France?", "  padded  ", "line one\nline two", "", "ünïcödé ✓ 日本語 🙂",
         'quotes "double" and \'single\'', "{{ not a template }}", "<|im_end|> inside", "2 + 2 = ?", "\t tab"]


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(TEXTS)}] if rng.random() < 0.4 else []
        for t in range(rng.randint(1, 6)):
            msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": rng.choice(TEXTS)})
        if rng.random() < 0.15:  # an irregular order, which some templates refuse
            rng.shuffle(msgs)
        yield msgs, rng.random() < 0.7, (TOOLS if rng.random() < 0.3 else None)


def hf_tokenizer(template: str):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                                chat_template=template, **SPECIAL)


@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_exactly_as_transformers(name):
    template = TEMPLATES[name]
    tok = hf_tokenizer(template)
    compared = refused = 0
    for msgs, gen, tools in conversations(80, seed=list(TEMPLATES).index(name)):
        try:
            want = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - the reference refused: so must we, in one line
            with pytest.raises(ChatTemplateError) as ours:
                render_chat(template, msgs, gen, SPECIAL, tools=tools)
            assert "\n" not in str(ours.value)
            assert str(e).split("\n")[0][:40] in str(ours.value)
            refused += 1
            continue
        assert render_chat(template, msgs, gen, SPECIAL, tools=tools) == want
        compared += 1
    assert compared >= 40  # 5 templates x 40+ = the 200+ conversations compared
    if name == "gemma":
        assert refused > 0  # the refusal path was exercised too


def test_smollm2_generation_prompt():
    text = render_chat(SMOLLM2, [{"role": "user", "content": "Hi"}], True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template, why", [
    ("{{ raise_exception('no system role') }}", "refused these messages: no system role"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range()"),
    ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "characters"),
    ("{{ messages.__class__.__mro__ }}", "refused"),
    ("{% for m in messages %}", "does not parse"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_a_bad_template_is_one_line(template, why):
    with pytest.raises(ChatTemplateError, match=why.replace("(", r"\(").replace(")", r"\)")) as e:
        render_chat(template, [{"role": "user", "content": "Hi"}])
    assert "\n" not in str(e.value)


def test_templates_from_hf_folders(tmp_path):
    assert template_from_hf_folder(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "default", "template": "A"},'
                                                    ' {"name": "tool_use", "template": "B"}]}')
    assert template_from_hf_folder(tmp_path) == "A"
    (tmp_path / "chat_template.jinja").write_text("C")
    assert template_from_hf_folder(tmp_path) == "C"  # the separate file wins, as in transformers
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        template_from_hf_folder(tmp_path)


def test_tokenizers_carry_their_template_and_end_of_turn(tmp_path):
    from minillm.data.chat_template import chat_prompt_for
    from minillm.data.tokenizer import load_tokenizer
    from minillm.data.tokenizer_gguf import GGUFTokenizer
    from minillm.data.tokenizer_hf import load_hf_tokenizer

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [3, 3, 3, 1, 1], "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": SMOLLM2}
    tok = GGUFTokenizer.from_metadata(meta)
    text, stops = chat_prompt_for(tok, [{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and stops == ["<|im_end|>"]
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").chat_template == SMOLLM2  # kept through a checkpoint

    # a Hugging Face folder: tokenizer.json + tokenizer_config.json with the template and eos
    hf_tok = hf_tokenizer(SMOLLM2)
    hf_tok.save_pretrained(tmp_path / "hf")
    ours = load_hf_tokenizer(tmp_path / "hf")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt_for(ours, msgs)[0] == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token == "</s>"
    assert chat_prompt_for(load_tokenizer_without_template(), msgs) is None


def load_tokenizer_without_template():
    class Plain:  # minillm's own char/BPE tokenizers have no chat template
        pass
    return Plain()
