"""Greedy generation, defined once: prompt formatting, the batched greedy continuations calibration validates
against, and one prompt's continuation for `generate`, `compare` and the demo."""

from __future__ import annotations

import torch

from ..common.errors import TaylorMLPError
from ..common.progress import bar
from ..release.sources import is_chat_model
from .decode import input_device


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, L] ids of `prompt` (chat-templated when `chat`), with the tokenizer's special tokens unless the text
    already starts with its BOS (a chat template that writes it): every timed prompt is encoded this way."""
    text = format_prompt(tokenizer, prompt, chat)
    return tokenizer(text, return_tensors="pt", add_special_tokens=not _has_bos(tokenizer, text)).input_ids


@torch.no_grad()
def greedy_sequences(model, tokenizer, prompts: list[str], max_new_tokens: int, desc: str = "generating",
                     batch_size: int = 32, recorder=None,
                     record: list[bool] | None = None) -> list[dict]:
    """Prompt ids plus the model's greedy continuation (cut after EOS), one dict per prompt.

    Prompts are generated in left-padded batches (similar lengths together, so that a streamed model onloads each
    layer once per decode step and batch); each returned sequence holds no padding.  With a `recorder`, the
    pre-activation ranges of every real token fed through the model (prompt, continuation up to its EOS) are
    recorded on the way: no second pass over these tokens is needed.  `record[k]` False keeps prompt k out of the
    ranges (validation prompts share the batches but not the ranges)."""
    encoded = [tokenizer(t, return_tensors="pt", add_special_tokens=not _has_bos(tokenizer, t)).input_ids[0]
               for t in prompts]
    pad = _pad_id(tokenizer)
    device = input_device(model)
    out: list[dict | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in bar(batches, desc=desc, unit="batch"):
        width = max(len(encoded[k]) for k in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, k in enumerate(batch):
            ids[row, width - len(encoded[k]):] = encoded[k]
            mask[row, width - len(encoded[k]):] = 1
        if recorder is not None:
            recorder.new_batch(None if record is None else torch.tensor([bool(record[k]) for k in batch]))
        gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad).cpu()
        for row, k in enumerate(batch):
            new = gen[row, width:]
            new = new[:len(until_eos(new.tolist(), eos_ids(tokenizer, model)))]
            out[k] = {"ids": torch.cat([encoded[k], new]), "prompt_len": len(encoded[k])}
    return out


def eos_ids(tokenizer, model=None) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """A continuation cut after its first EOS token (kept), as a generation that stops at EOS ends."""
    for k, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:k + 1])
    return list(tokens)


def _has_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def context_length(config) -> int | None:
    """The longest sequence the model's position scheme was built for (max_position_embeddings, n_positions, ...)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt(prompt, where: str = "the prompt") -> str:
    """A prompt is text: a str that encodes as UTF-8 (no undecodable bytes) and holds no NUL characters."""
    if not isinstance(prompt, str):
        raise TaylorMLPError(f"{where} must be text, got {type(prompt).__name__} {str(prompt)[:40]!r}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaylorMLPError(f"{where} is not text: it holds bytes that are not UTF-8 (at character {exc.start}); "
                             f"give UTF-8 text") from exc
    if "\x00" in prompt:
        raise TaylorMLPError(f"{where} is not text: it holds a NUL character (at character {prompt.index(chr(0))}); "
                             f"give plain text")
    return prompt


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, chat: bool, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy continuation of `prompt` (new token ids, prompt length).  An empty prompt starts from the BOS token; a
    prompt that, with `max_new_tokens`, runs past the model's context is refused."""
    check_prompt(prompt)
    if chat and not is_chat_model(tokenizer):
        raise TaylorMLPError("--chat given, but this model's tokenizer has no chat template; drop --chat to use the "
                             "prompt as plain text")
    ids = encode_prompt(tokenizer, prompt, chat)
    if ids.shape[1] == 0:  # an empty prompt (the tokenizer adds no BOS by itself): start from BOS
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = getattr(model.generation_config, "bos_token_id", None) if model.generation_config else None
        if bos is None:
            bos = getattr(model.config, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
        if bos is None:
            raise TaylorMLPError("the prompt is empty and this model has no BOS token to start from; give a prompt")
        ids = torch.tensor([[int(bos)]], dtype=torch.long)
    limit = context_length(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        if ids.shape[1] >= limit:
            raise TaylorMLPError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit} "
                                 f"tokens (max_position_embeddings); shorten the prompt")
        raise TaylorMLPError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that runs "
                             f"past the model's context of {limit} tokens (max_position_embeddings); shorten the prompt "
                             f"or use --max-new-tokens {limit - ids.shape[1]} or less")
    pad = _pad_id(tokenizer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return out[0, ids.shape[1]:], ids.shape[1]


def generate_text(model, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 64) -> tuple[str, int]:
    new, _ = generate_ids(model, tokenizer, prompt, chat, max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())
