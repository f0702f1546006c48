"""The chat endpoint prompts a model in its own chat template, as transformers' apply_chat_template.

A tiny random model with a byte-level GGUF tokenizer that carries SmolLM2's ChatML template is
served in-process; the `openai` client sends chats; the prompt the server built is compared with
what transformers renders from the same template.
"""

import pytest
import torch

from minillm.data.tokenizer_gguf import GGUFTokenizer, bytes_to_unicode
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model
from tests.helpers import SMOLLM2_TEMPLATE

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

SMOLLM2 = SMOLLM2_TEMPLATE
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! ✓"}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    from minillm.serve import handlers
    from minillm.serve.api import build_app

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    tok = GGUFTokenizer(tokens, [], [3, 3, 3] + [1] * 256, "gpt2", bos_id=1, eos_id=2, chat_template=SMOLLM2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=512, vocab_size=len(tokens),
                                    positional="rotary", norm="rmsnorm", activation="swiglu", bias=False)).eval()
    prompts = []
    real_fit = handlers.fit

    def recording_fit(v, req, texts, *args, **kwargs):
        prompts.extend(texts)
        return real_fit(v, req, texts, *args, **kwargs)

    handlers.fit = recording_fit
    try:
        with TestClient(build_app(model, tok, "smol")) as client:
            yield client, prompts
    finally:
        handlers.fit = real_fit


def test_the_server_prompts_in_the_models_template(served):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    client, prompts = served
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), chat_template=SMOLLM2)
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    for chat in CHATS:
        prompts.clear()
        reply = api.chat.completions.create(model="smol", messages=chat, max_tokens=4, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert prompts == [reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]


def test_developer_is_the_system_role(served):
    client, prompts = served
    prompts.clear()
    r = client.post("/v1/chat/completions", json={"model": "smol", "max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
