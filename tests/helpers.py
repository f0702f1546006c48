"""Pieces several test files share: a server in a thread, a small Hugging Face tokenizer, a template.

Imported as `from tests.helpers import ...` (the suite runs from the repository root)."""

import contextlib
import threading
import time
from pathlib import Path

# SmolLM2-135M-Instruct's chat template, as its GGUF file carries it (tokenizer.chat_template): data
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@contextlib.contextmanager
def running(srv, timeout_s: float = 30.0):
    """Run a uvicorn.Server in a daemon thread for the duration of the block; yields the server."""
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield srv
    finally:
        srv.should_exit = True
        thread.join(timeout=timeout_s)


def write_bpe_tokenizer_json(folder: Path, texts: list[str], vocab_size: int = 300) -> None:
    """A byte-level BPE trained on `texts` with the `tokenizers` library, saved as folder/tokenizer.json."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(Path(folder) / "tokenizer.json"))
