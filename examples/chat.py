"""A chat model that answers token by token, on the GPU tier: a streaming splitspace app.

    splitspace dev examples/chat.py

The function is a generator: each ``yield`` reaches the browser (and every API client)
the moment the GPU tier produces it, fairly shared with everyone else's calls; a visitor
who closes the tab stops the generation. The model is loaded on the GPU tier only, at its
first call: the frontend imports this file too, and must stay small.

By default the model is a tiny GPT-2 with random weights and a word-level tokenizer, both
made here in code (no download): its answers are random words, but it runs anywhere, in
a second. For a real model, name it (any causal LM with a chat template on the Hub)::

    SPLITSPACE_CHAT_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct splitspace dev examples/chat.py
"""

from __future__ import annotations

import os
import threading
from typing import Any

import gradio as gr

import splitspace

MAX_NEW_TOKENS = 48
CORPUS = """the quick brown fox jumps over the lazy dog while a small bird sings in the old tree
a river runs past the quiet town and the children play by the water until the sun goes down
every morning the baker opens her shop and the smell of fresh bread fills the narrow street
we talk about stars and rain and the long road home and laugh at the clouds that look like ships"""

_loaded: tuple[Any, Any] | None = None
_lock = threading.Lock()


def tiny_model() -> tuple[Any, Any]:
    """A two-layer GPT-2 with random weights and a word-level tokenizer of the corpus above."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted(set(CORPUS.split()))
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=256,
        n_layer=2,
        n_head=2,
        n_embd=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    return tokenizer, GPT2LMHeadModel(config).eval()


def load() -> tuple[Any, Any]:
    """The tokenizer and the model, loaded once, on the first call (on the GPU tier)."""
    global _loaded
    with _lock:
        if _loaded is None:
            name = os.environ.get("SPLITSPACE_CHAT_MODEL")
            if name:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                device = "cuda" if torch.cuda.is_available() else "cpu"
                _loaded = AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name).to(device)
            else:
                _loaded = tiny_model()
        return _loaded


def prompt_ids(tokenizer: Any, message: str, history: list[dict[str, Any]]) -> Any:
    """The conversation as the model's input ids (its chat template if it has one)."""
    turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
    turns.append({"role": "user", "content": message})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    text = " ".join(t["content"] for t in turns) or "the"
    return tokenizer(text, return_tensors="pt")["input_ids"][:, -200:]


def _text(content: Any) -> str:
    """A message's text (Gradio gives it as a string or as a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


@splitspace.gpu(duration=lambda message, history: 0.02 * MAX_NEW_TOKENS, time_limit=120)
def respond(message: str, history: list[dict[str, Any]]):  # noqa: ANN201 (a generator)
    """Answer ``message``, token by token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tokenizer, model = load()
    stop = threading.Event()

    class StopWhenAsked(StoppingCriteria):  # the caller left: the generation thread ends too
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    ids = prompt_ids(tokenizer, message, history).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    generation = threading.Thread(
        target=model.generate,
        kwargs=dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=True,
            top_k=50,
            pad_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
        ),
        daemon=True,
    )
    generation.start()
    answer = ""
    try:
        for piece in streamer:
            if not piece:  # (the streamer also gives empty pieces)
                continue
            answer += piece
            if answer.strip():
                yield answer
    finally:
        stop.set()
        generation.join()


demo = gr.ChatInterface(respond, title="Chat", api_name="chat")

if __name__ == "__main__":
    demo.launch()
