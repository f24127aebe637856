"""trainer.py: a whole training run around jora's step, as train.py runs it.

Read jora.py first: it holds the technique (model, LoRA, tensor parallelism, loss, AdamW, the
step, packed batches, generation, Hugging Face files). This file adds what a run on real data
needs around it, top to bottom:
  1 data: Alpaca, RAFT, prompt/completion and chat files (conversations rendered by the
    model's own template, audited) -> examples -> packed rows, in a deterministic order that
    a checkpoint can resume; the batch shape chosen from the model and the data
  2 scoring RAFT answers
  3 compiling the step, and remat "auto": the fastest jora.Plan whose memory fits the device
  4 checkpoints and the run folder (OUT): one run a folder, resume, overwrite
  5 the loop: train(), with tokens/s counting the training steps alone
  6 the flags train.py and bench/benchmark.py share
"""
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jora


# 1. Data: files -> examples -> packed rows ------------------------------------------------------

class Example(NamedTuple):
    tokens: np.ndarray        # (n,) int32: BOS, prompt, answer, EOS
    weights: np.ndarray       # (n,) fp32: 1 on answer tokens and EOS (the tokens to predict)


ALPACA = ("Below is an instruction that describes a task{}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n{}### Response:\n")


def alpaca_prompt(instruction: str, input_: str = "") -> str:
    """The Stanford Alpaca prompt template (with or without an input)."""
    if input_:
        return ALPACA.format(", paired with an input that provides further context",
                             instruction, f"### Input:\n{input_}\n\n")
    return ALPACA.format("", instruction, "")


FORMAT_KEYS = {"alpaca": ("instruction", "output"), "raft": ("instruction", "cot_answer"),
               "completion": ("prompt", "completion")}
OPTIONAL_KEYS = dict(alpaca=("input",), raft=("oracle_context",), completion=())


def _kind(value) -> str:   # what a JSON value is, in words
    return jora.JSON_KIND.get(type(value), "JSON")


def _parse_records(path: str, text: str) -> list:
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            try:   # valid JSON, but one value over several lines: not JSONL
                whole = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: record {len(records) + 1} (line {n}) is malformed "
                                 f"JSON ({e.msg})") from None
            raise ValueError(f"{path}: holds {_kind(whole)} where a list of "
                             f"records (JSON) or one record a line (JSONL) was expected") from None
    return records


# Chat: conversations rendered by the model's own template, trained on the assistant's turns.
# A chat record is {"messages": [{"role", "content"}, ...]} (OpenAI) or {"conversations":
# [{"from", "value"}, ...]} (ShareGPT). The template renders the whole conversation; its ids are
# the example, and the weights are 1 exactly on each assistant turn's content and the end-of-turn
# token that closes it.

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# Tokens that close a turn in the chat formats of the families jora reads, besides the
# tokenizer's own stop ids: Llama-3's <|eot_id|> (<|eom_id|> after a tool call), ChatML's
# <|im_end|> (Qwen), Phi-3's <|end|>, Gemma's <end_of_turn>, Llama-2/Mistral's </s>.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>")


def chat_template(folder: str, override: str | None = None) -> str | None:
    """The chat template (Jinja source) for a model: the file `override` (--chat-template) if
    given, else `chat_template.jinja` in the model's folder, else tokenizer_config.json's
    `chat_template` (a string, or a list of {name, template} of which "default" is taken).
    folder may be the model folder or a file in it. None if there is none."""
    if override is not None:
        if not os.path.isfile(override):
            raise ValueError(f"--chat-template {override}: no such file")
        return jora.read_text(override)
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        return jora.read_text(path)
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    value = jora.read_json(path).get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: chat_template is a list of templates without one named "
                         f"'default' (names: {sorted(map(str, named))}); pass --chat-template")
    raise ValueError(f"{path}: chat_template is {_kind(value)}, not a string or a list")


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    """The template compiled as transformers compiles it (cached: compiling takes milliseconds,
    rendering a conversation far less)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        # transformers' {% generation %} ... {% endgeneration %} marks assistant text for its
        # assistant masks; it renders the body unchanged, in a scope of its own, as here.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own tojson escapes HTML characters and sorts keys.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, bos_token, eos_token,
                add_generation_prompt: bool = False, now: datetime.datetime | None = None) -> str:
    """The conversation as the chat template writes it, rendered exactly as transformers'
    apply_chat_template(tokenize=False) does: a sandboxed Jinja environment with trim_blocks and
    lstrip_blocks, transformers' tojson, raise_exception (raises ValueError with the
    template's message) and strftime_now (formats `now`, default the clock). Like transformers
    it passes tools=None and documents=None (a template may test `tools is defined`)."""
    now = now or datetime.datetime.now()
    return _compiled_template(template).render(
        messages=messages, tools=None, documents=None, bos_token=bos_token, eos_token=eos_token,
        add_generation_prompt=add_generation_prompt, strftime_now=now.strftime)


@functools.lru_cache(maxsize=8)
def _tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    return jora.read_json(path) if os.path.isfile(path) else {}


def chat_special_tokens(tok: jora.Tokenizer) -> tuple[str | None, str | None]:
    """(bos_token, eos_token): the strings a chat template gets. tokenizer_config.json's
    bos_token and eos_token where it sets them (null stays None: Qwen has no BOS), else the
    text of the tokenizer's BOS and EOS ids (sentencepiece: their pieces, <s> and </s>)."""
    config = _tokenizer_config(os.path.dirname(tok.path))

    def text(key, i):
        if key in config:
            value = config[key]
            return value.get("content") if isinstance(value, dict) else value
        if i is None:
            return None
        return tok.sp.id_to_piece(i) if tok.sp is not None else tok.hf.id_to_token(i)

    return text("bos_token", tok.bos_id), text("eos_token", tok.eos_id)


def _check_roles(roles: list[str], where: str):
    """An optional system message first, then user and assistant alternating, starting with the
    user; at least one assistant message (the text to train on)."""
    if not roles:
        raise ValueError(f"{where} has no messages")
    for n, role in enumerate(roles, 1):
        if role not in CHAT_ROLES:
            raise ValueError(f"{where} message {n} has role {role!r}; chat data takes "
                             f"system, user and assistant")
    start = 1 if roles[0] == "system" else 0
    for n, role in enumerate(roles[start:], start + 1):
        want = "user" if (n - start) % 2 == 1 else "assistant"
        if role != want:
            raise ValueError(f"{where} message {n} is {role!r} where {want!r} was expected "
                             f"(an optional system message first, then user and assistant "
                             f"alternating, starting with user)")
    if "assistant" not in roles:
        raise ValueError(f"{where} has no assistant message (nothing to train on)")


def chat_messages(record: dict, i: int, path: str) -> list[dict]:
    """The record's conversation as OpenAI-style messages [{"role", "content"}], from `messages`
    ([{role, content}], roles system/user/assistant) or ShareGPT `conversations` ([{from,
    value}], from system/human/user/gpt/assistant). i is the record's number in the file (from
    1). Refuses, in one line naming the file and record: a bad shape, an unknown role, roles out
    of order, an empty assistant message, no assistant message."""
    where = f"{path}: record {i}"
    if "messages" in record:
        key, role_key, text_key, names = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    elif "conversations" in record:
        key, role_key, text_key, names = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise ValueError(f"{where} has neither 'messages' nor 'conversations' (keys "
                         f"{sorted(record)})")
    turns = record[key]
    if not isinstance(turns, list):
        raise ValueError(f"{where} field '{key}' is {_kind(turns)}, not a list of messages")
    messages = []
    for n, m in enumerate(turns, 1):
        if not isinstance(m, dict):
            raise ValueError(f"{where} {key}[{n}] is {_kind(m)}, not an object")
        for k in (role_key, text_key):
            if k not in m:
                raise ValueError(f"{where} {key}[{n}] has no '{k}'")
            if not isinstance(m[k], str):
                raise ValueError(f"{where} {key}[{n}] field '{k}' is {_kind(m[k])}, not a string")
        if m[role_key] not in names:
            raise ValueError(f"{where} {key}[{n}] has {role_key} {m[role_key]!r}; expected one "
                             f"of {', '.join(names)}")
        role = names[m[role_key]]
        if role == "assistant" and not m[text_key].strip():
            raise ValueError(f"{where} {key}[{n}] is an empty assistant message")
        messages.append({"role": role, "content": m[text_key]})
    _check_roles([m["role"] for m in messages], where)
    return messages


@functools.lru_cache(maxsize=8)
def _sentencepiece_specials(tok: jora.Tokenizer):
    """(regex matching the text of the model's control pieces and unk, whether sentencepiece
    adds its dummy-prefix space)."""
    sp = tok.sp
    texts = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
             if sp.IsControl(i) or sp.IsUnknown(i)]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
    return pattern, sp.encode("a", out_type=str)[0].startswith("\u2581")


def _sentencepiece_text_ids(tok: jora.Tokenizer, text: str, prefix: bool) -> list[int]:
    if not text:
        return []
    if prefix and text.startswith(" "):   # the text's own space is the prefix: no second one
        return tok.sp.encode(text[1:]) if len(text) > 1 else [tok.sp.piece_to_id("\u2581")]
    return tok.sp.encode(text)


def encode_rendered(tok: jora.Tokenizer, text: str) -> list[int]:
    """The ids of a rendered chat, special-token text (<|im_end|>, <s>, [INST]) as its ids, and
    no BOS added (the template writes its own). tokenizers: encode(text, add_special_tokens=
    False), as transformers' apply_chat_template(tokenize=True). sentencepiece never reads
    control-token text, so the text is split at each control piece (and <unk>); each piece of
    text between is encoded with sentencepiece's dummy-prefix space unless it already starts
    with a space, which then serves as that prefix. That gives Meta's Llama-2 chat encoding
    (<s>, ▁[INST] …) and mistral-common's v3 one (<s>, [INST], ▁What … [/INST], ▁The … </s>)."""
    if tok.sp is None:
        return tok.hf.encode(text, add_special_tokens=False).ids
    pattern, prefix = _sentencepiece_specials(tok)
    ids, start = [], 0
    for m in pattern.finditer(text):
        ids += _sentencepiece_text_ids(tok, text[start:m.start()], prefix)
        ids.append(tok.sp.piece_to_id(m.group()))
        start = m.end()
    return ids + _sentencepiece_text_ids(tok, text[start:], prefix)


def token_text(tok: jora.Tokenizer, ids) -> str:
    """The text that ids stand for, special tokens written out (jora.Tokenizer.decode drops
    them), and every space kept (sentencepiece's decode drops a leading one)."""
    ids = [int(i) for i in ids]
    if tok.sp is None:
        return tok.hf.decode(ids, skip_special_tokens=False)
    out, raw = [], bytearray()
    for i in ids:
        piece = tok.sp.id_to_piece(i)
        if tok.sp.IsByte(i):   # <0xNN>: bytes gather until they form characters
            raw.append(int(piece[3:5], 16))
            continue
        if raw:
            out.append(raw.decode("utf-8", "replace"))
            raw.clear()
        special = tok.sp.IsControl(i) or tok.sp.IsUnknown(i)
        out.append(piece if special else piece.replace("\u2581", " "))
    return "".join(out) + raw.decode("utf-8", "replace")


def _single_id(tok: jora.Tokenizer, text: str | None) -> int | None:
    """The id of a token's text, None if the text is not one token."""
    ids = encode_rendered(tok, text) if text else []
    return ids[0] if len(ids) == 1 and token_text(tok, ids) == text else None


def _end_ids(tok: jora.Tokenizer, eos_token) -> set[int]:
    """Ids that may close an assistant turn: the tokenizer's stop ids, the template's eos_token,
    and each END_OF_TURN token the vocabulary has as one id."""
    ids = (_single_id(tok, text) for text in (eos_token, *END_OF_TURN))
    return set(tok.stop_ids) | {i for i in ids if i is not None}


def _sentinel(content: str, text: str) -> str:
    """Text to put in place of an assistant turn's content: it must differ from the content in
    its first and last character (else the ids around the content could agree with the
    sentinel's and the content's first or last token go untrained), carry no whitespace at its
    ends (templates trim content) and not occur in the rendered conversation."""
    first, last = content.strip()[:1], content.strip()[-1:]
    for a in "~@#%":
        for b in "~@#%":
            s = f"{a}jora-sentinel{b}"
            if a != first and b != last and s not in text:
                return s
    raise AssertionError("no sentinel")   # 16 candidates: only a crafted text exhausts them


def _common_ends(a: list[int], b: list[int]) -> tuple[int, int]:
    """(length of the common prefix, length of the common suffix that does not overlap it)."""
    n = min(len(a), len(b))
    p = 0
    while p < n and a[p] == b[p]:
        p += 1
    s = 0
    while s < n - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return p, s


def _answer(content: str) -> str:
    """An assistant message's answer: its text after a closing </think>, if any, stripped
    (Qwen3's template drops earlier turns' reasoning)."""
    return content.split("</think>")[-1].strip()


def _chat_warnings(messages, tokens, text, render, tok) -> list[str]:
    """What an example is silently missing, one line each (no file or record, so that a caller
    can count identical ones)."""
    warnings = []
    if messages[0]["role"] == "system" and messages[0]["content"].strip() not in text:
        warnings.append("the chat template drops the system message (its text is not in the "
                        "rendered conversation)")
    # The prompt of the last assistant turn: the conversation up to the user message before it.
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    prompt = encode_rendered(tok, render(messages[:last], True))
    if list(tokens[:len(prompt)]) != prompt:
        warnings.append("the generation prompt (the conversation up to the user message before "
                        "its last assistant message, rendered with add_generation_prompt) is "
                        "not a prefix of the training text: the model trains on a context it "
                        "is not prompted with")
    return warnings


def _renderer(template, tok, where, now):
    """render(messages, add_generation_prompt) -> text, with one-line errors naming the record."""
    bos_token, eos_token = chat_special_tokens(tok)

    def render(messages, add_generation_prompt=False):
        try:
            return render_chat(template, messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, now=now)
        except ValueError as e:   # the template's raise_exception
            raise ValueError(f"{where}: the chat template refuses it: {e}") from None
        except Exception as e:    # jinja2's errors: undefined names, sandbox, syntax
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"{where}: the chat template failed ({type(e).__name__}: "
                             f"{first})") from None

    return render, eos_token


def _content_by_sentinel(messages, k, tokens, text, render, tok,
                         turn) -> tuple[int, int] | None:
    """(start, stop) of the ids of assistant message k's content, or None where this method
    cannot tell them. Renders the conversation again with that content replaced by a sentinel:
    the two id lists agree up to the first token the content touches and again after its last,
    so the ids between are the content, whatever the template writes around it. A token that
    joins template text to the content (Mistral's ' ' + content is one ▁The) is the content's
    when the joined text is whitespace; any other difference outside the content (Qwen3 moves a
    <think> block of the content into its own markup) gives None. Refuses a template that
    does not write the content at all."""
    m = messages[k]
    sentinel = _sentinel(m["content"], text)
    other = render(messages[:k] + [{**m, "content": sentinel}] + messages[k + 1:])
    if sentinel not in other:
        raise ValueError(f"{turn}: the chat template drops its content")
    other = encode_rendered(tok, other)
    start, same_after = _common_ends(tokens, other)
    stop = len(tokens) - same_after
    around = token_text(tok, other[start:len(other) - same_after]).split(sentinel)
    got = token_text(tok, tokens[start:stop])
    if (len(around) != 2 or around[0].strip() or around[1].strip()
            or not got.startswith(around[0]) or not got.endswith(around[1])
            or len(got) < len(around[0]) + len(around[1])):
        return None
    return start, stop


def _turn_by_prefix(messages, k, tokens, render, tok) -> int | None:
    """Where assistant message k starts: after the ids of the conversation before it rendered
    with add_generation_prompt, if those are a prefix of the conversation's ids; else None."""
    prompt = encode_rendered(tok, render(messages[:k], True))
    return len(prompt) if tokens[:len(prompt)] == prompt else None


def chat_example(messages: list[dict], tok: jora.Tokenizer, template: str, *, record: int,
                 path: str) -> tuple[Example, dict]:
    """-> (Example, info). The example's tokens are the ids of the whole conversation as the
    template renders it (encode_rendered: no BOS added; the template writes its own). Its weights
    are 1 exactly on each assistant turn's content and on the end-of-turn token that follows it
    (with any whitespace tokens between, e.g. Llama-2's ' ' before </s>), 0 elsewhere: never on
    the template's text around it (headers, Qwen3's empty <think></think>, Qwen's '\\n' after
    <|im_end|>). info: {"spans": [(start, stop)] per assistant turn, "methods": how each was
    found, "text": the rendered conversation, "warnings": _chat_warnings' lines}. Refuses (one
    line naming the file and record) roles out of order, a template that raises, an assistant
    turn whose content or end-of-turn token the rendered ids lack."""
    where = f"{path}: record {record}"
    _check_roles([m["role"] for m in messages], where)
    render, eos_token = _renderer(template, tok, where, datetime.datetime.now())
    text = render(messages)
    tokens = encode_rendered(tok, text)
    ends = _end_ids(tok, eos_token)
    weights = np.zeros(len(tokens), np.float32)
    spans, methods = [], []
    # Each assistant turn's span comes from rendered ids, two ways. First the sentinel (see
    # _content_by_sentinel): it finds the content exactly, wherever the template puts it, and
    # rendering prefix by prefix cannot serve every template: Mistral v0.3 moves the system
    # prompt into the last user turn, so a shorter conversation is not a prefix of the whole,
    # and Qwen3 writes an empty <think></think> after the generation prompt of the final turn
    # only, which is template text, not the content. Where the sentinel cannot separate the
    # content (Qwen3 moves a final turn's <think> reasoning into its own markup), the turn
    # starts after its generation prompt (_turn_by_prefix), so that the reasoning is trained
    # with the answer, as the model writes both.
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn = f"{where} message {k + 1} (assistant)"
        found = _content_by_sentinel(messages, k, tokens, text, render, tok, turn)
        if found is not None:
            start, stop = found
            if not token_text(tok, tokens[start:stop]).strip():
                raise ValueError(f"{turn}: the chat template drops its content")
            end = stop   # the end token: the first id after the content, past whitespace
            while end < len(tokens) and tokens[end] not in ends and not token_text(
                    tok, tokens[end:end + 1]).strip():
                end += 1
            methods.append("sentinel")
        else:
            start = _turn_by_prefix(messages, k, tokens, render, tok)
            if start is None:
                raise ValueError(f"{turn}: cannot find its content in the rendered ids (the "
                                 f"template changes other text with it, and the conversation "
                                 f"before it, with the generation prompt, is not a prefix)")
            end = next((j for j in range(start, len(tokens)) if tokens[j] in ends), len(tokens))
            if _answer(m["content"]) not in token_text(tok, tokens[start:end]):
                raise ValueError(f"{turn}: the rendered ids lack its content (it is not "
                                 f"after its generation prompt)")
            methods.append("prefix")
        if end == len(tokens) or tokens[end] not in ends:
            names = sorted(token_text(tok, [i]) for i in ends)
            raise ValueError(f"{turn}: no end-of-turn token ({', '.join(names)}) follows its "
                             f"content in the rendered conversation")
        if spans and start < spans[-1][1]:
            raise ValueError(f"{turn}: its tokens overlap the previous assistant turn's")
        spans.append((start, end + 1))
        weights[start:end + 1] = 1
    example = Example(np.asarray(tokens, np.int32), weights)
    info = dict(spans=spans, methods=methods, text=text,
                warnings=_chat_warnings(messages, tokens, text, render, tok))
    return example, info


def _trained_runs(weights) -> list[tuple[int, int]]:
    """[(start, stop)] of each run of nonzero weights."""
    on = np.concatenate([[0], (np.asarray(weights) > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def audit_chat(example: Example, messages: list[dict], tok: jora.Tokenizer, template: str, *,
               record: int, path: str) -> list[str]:
    """Checks a chat example against its conversation; -> warnings (one line each: the template
    drops the system message; the generation prompt is not a prefix of the training text).
    Raises ValueError (one line naming the file and record) where: roles are out of order; the
    example starts with two BOS ids; an assistant turn has no trained span, its span does not
    end with a trained end-of-turn token (absent, or present but untrained), or its content is
    not among its trained tokens."""
    where = f"{path}: record {record}"
    _check_roles([m["role"] for m in messages], where)
    render, eos_token = _renderer(template, tok, where, datetime.datetime.now())
    tokens = [int(t) for t in example.tokens]
    bos = {tok.bos_id, _single_id(tok, chat_special_tokens(tok)[0])} - {None}
    if len(tokens) > 1 and tokens[0] == tokens[1] and tokens[0] in bos:
        raise ValueError(f"{where}: the example starts with two BOS tokens "
                         f"({token_text(tok, tokens[:2])!r}): the template writes one, so the "
                         f"rendered text must be tokenized without adding another")
    ends = _end_ids(tok, eos_token)
    runs = _trained_runs(example.weights)
    assistant = [(k, m) for k, m in enumerate(messages) if m["role"] == "assistant"]
    if len(runs) < len(assistant):
        raise ValueError(f"{where}: {len(assistant)} assistant turns but {len(runs)} trained "
                         f"spans: an assistant turn is untrained")
    if len(runs) > len(assistant):
        raise ValueError(f"{where}: {len(runs)} trained spans but {len(assistant)} assistant "
                         f"turns: text outside the assistant turns is trained")
    for (k, m), (start, stop) in zip(assistant, runs):
        turn = f"{where} message {k + 1} (assistant)"
        if tokens[stop - 1] not in ends:
            if stop < len(tokens) and tokens[stop] in ends:
                raise ValueError(f"{turn}: its end-of-turn token "
                                 f"{token_text(tok, tokens[stop:stop + 1])!r} is untrained")
            raise ValueError(f"{turn}: no end-of-turn token closes its trained tokens")
        if _answer(m["content"]) not in token_text(tok, tokens[start:stop]):
            raise ValueError(f"{turn}: its content is missing from its trained tokens")
    return _chat_warnings(messages, tokens, render(messages), render, tok)


def mark_spans(example: Example, tok: jora.Tokenizer) -> str:
    """The example as text, special tokens written out, each trained span inside ⟦ ⟧ (for
    --check-data)."""
    tokens, parts, at = example.tokens, [], 0
    for start, stop in _trained_runs(example.weights):
        parts += [token_text(tok, tokens[at:start]), "\u27e6", token_text(tok, tokens[start:stop]),
                  "\u27e7"]
        at = stop
    return "".join(parts + [token_text(tok, tokens[at:])])


def chat_prompt(text: str, tok: jora.Tokenizer, template: str) -> list[int]:
    """A user's text as the model's template asks for an answer: the prompt ids of --generate
    on a model with a template."""
    render, _ = _renderer(template, tok, "--prompt", datetime.datetime.now())
    return encode_rendered(tok, render([{"role": "user", "content": text}], True))


def chat_end_ids(tok: jora.Tokenizer) -> tuple[int, ...]:
    """The ids that may end an assistant's turn (the tokenizer's stop ids, the eos_token a
    template gets, and the known end-of-turn tokens): generation stops at them."""
    return tuple(sorted(_end_ids(tok, chat_special_tokens(tok)[1])))


def require_chat_template(template: str | None, path: str):
    if template is None:
        raise ValueError(f"{path}: chat records need the model's chat template (its "
                         f"tokenizer_config.json or chat_template.jinja has none): pass "
                         f"--chat-template FILE")


def chat_record(record: dict, i: int, tok: jora.Tokenizer, template: str,
                path: str) -> tuple[Example, list[str]]:
    """Chat record i -> (its example, the audit's warnings without the record's name). Refuses
    (ValueError naming the record) what chat_messages, chat_example and audit_chat refuse."""
    messages = chat_messages(record, i, path)
    example, _ = chat_example(messages, tok, template, record=i, path=path)
    warnings = audit_chat(example, messages, tok, template, record=i, path=path)
    return example, [line.split(": ", 2)[-1] for line in warnings]


def read_records(path: str, fmt: str = "auto") -> tuple[list[dict], str]:
    """Read a JSON list or JSONL file -> (records, format). Errors name the file and record."""
    records = _parse_records(path, jora.read_text(path))
    if not records:
        raise ValueError(f"{path}: no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is {_kind(r)}, not a JSON "
                             f"object")
    if fmt == "auto" and ("messages" in records[0] or "conversations" in records[0]):
        fmt = "chat"
    if fmt == "auto":
        fmt = next((f for f in ("raft", "alpaca", "completion")
                    if all(k in records[0] for k in FORMAT_KEYS[f])), None)
        if fmt is None:
            raise ValueError(f"{path}: record 1 has keys {sorted(records[0])}; cannot tell the "
                             f"format (alpaca needs instruction/output, raft "
                             f"instruction/cot_answer, completion prompt/completion, chat "
                             f"messages or conversations)")
    if fmt == "chat":   # each conversation is checked as it is read (chat_messages)
        for i, r in enumerate(records, 1):
            chat_messages(r, i, path)
        return records, fmt
    optional = OPTIONAL_KEYS[fmt]
    for i, r in enumerate(records, 1):
        for k in FORMAT_KEYS[fmt] + ("question",) * (fmt == "raft") + optional:
            if k not in r and k not in optional:
                raise ValueError(f"{path}: record {i} has no '{k}' (format {fmt})")
            if k in r and not isinstance(r[k], str):
                raise ValueError(f"{path}: record {i} field '{k}' is {type(r[k]).__name__}, "
                                 f"not a string")
        ctx = r.get("context", {}) if fmt == "raft" else {}
        docs = ctx.get("sentences", [[]]) if isinstance(ctx, dict) else None
        if not (isinstance(docs, list) and docs and isinstance(docs[0], list)
                and all(isinstance(d, str) for d in docs[0])):
            k, v = ("context", ctx) if docs is None else ("context.sentences", docs)
            raise ValueError(f"{path}: record {i} field '{k}' is {_kind(v)}; "
                             f'format raft expects "context": {{"sentences": [[document, ...]]}}')
    return records, fmt


def _prompt(r: dict, fmt: str, tok: jora.Tokenizer, docs=None) -> list[int]:
    if fmt == "alpaca":
        return tok.encode(alpaca_prompt(r["instruction"], r.get("input", "")), bos=True)
    if fmt == "raft" and docs is not None:   # gorilla raft.py's layout
        return tok.encode("".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + r["question"],
                          bos=True)
    return tok.encode(r["prompt" if fmt == "completion" else "instruction"], bos=True)


def tokenize_chats(records, tok: jora.Tokenizer, template: str | None, seq_len: int,
                   path: str = "data", log=None):
    """Chat records -> (examples, report, warnings): each conversation rendered by `template`,
    trained on its assistant turns, and audited (audit_chat: a refusal names the record). A
    conversation longer than seq_len + 1 tokens is skipped (cut, it would lose an end token).
    warnings: each kind of audit warning once, with the records it applies to."""
    require_chat_template(template, path)
    report = dict(examples=0, trained_tokens=0, tokens=0, skipped=0)
    out, warned, shown = [], {}, time.time()
    for i, r in enumerate(records, 1):
        if log and time.time() - shown > 10:
            log(f"{path}: rendered {i - 1:,} of {len(records):,} conversations")
            shown = time.time()
        example, warnings = chat_record(r, i, tok, template, path)
        for kind in warnings:
            warned.setdefault(kind, []).append(i)
        if len(example.tokens) > seq_len + 1:
            report["skipped"] += 1
            continue
        out.append(example)
        report["tokens"] += len(example.tokens)
        report["trained_tokens"] += int(example.weights.sum())
    report["examples"] = len(out)
    if not out:
        raise ValueError(f"{path}: no usable conversations: all {len(records)} are longer than "
                         f"--seq-len {seq_len}")
    warnings = [f"warning: {path}: {kind} ({len(at)} records, the first {at[0]})"
                for kind, at in warned.items()]
    return out, report, warnings


def tokenize_records(records, fmt: str, tok: jora.Tokenizer, seq_len: int, path: str = "data",
                     log=None):
    """-> (examples, report). An example is at most seq_len + 1 tokens (one row's inputs and
    targets). RAFT examples that are too long lose distractor documents first (longest first;
    never the oracle, never the answer); what still does not fit is skipped; other formats
    are truncated at the end of the answer if the prompt fits, else skipped. Nothing silent:
    `report` counts every such case. log: called with a progress line every 10 s."""
    report = dict(examples=0, dropped_distractors=0, shortened_raft=0, truncated=0, skipped=0)
    out = []
    limit = seq_len + 1
    shown = time.time()
    for i, r in enumerate(records):
        if log and time.time() - shown > 10:   # ~700 long RAFT records a second
            log(f"{path}: tokenized {i:,} of {len(records):,} records")
            shown = time.time()
        answer = tok.encode(r[FORMAT_KEYS[fmt][1]]) + [tok.eos_id]
        prompt = _prompt(r, fmt, tok)
        if fmt == "raft":
            docs = list(r.get("context", {}).get("sentences", [[]])[0])
            oracle = r.get("oracle_context")
            dropped = 0
            while len(prompt) + len(answer) > limit and any(d != oracle for d in docs):
                docs.remove(max((d for d in docs if d != oracle), key=len))
                prompt = _prompt(r, fmt, tok, docs)
                dropped += 1
            report["dropped_distractors"] += dropped
            report["shortened_raft"] += dropped > 0
        if len(prompt) + len(answer) > limit:
            if fmt == "raft" or len(prompt) >= limit:
                report["skipped"] += 1
                continue
            answer = answer[:limit - len(prompt)]
            report["truncated"] += 1
        w = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(answer), np.float32)])
        out.append(Example(np.asarray(prompt + answer, np.int32), w))
    report["examples"] = len(out)
    if not out:
        raise ValueError(f"{path}: no usable examples: all {len(records)} records are longer "
                         f"than --seq-len {seq_len} ({report})")
    return out, report


def padded_length(n: int, limit: int, bucket: int = 64) -> int:
    """n positions rounded up to a multiple of `bucket`, one that doubles each time n doubles past
    16 buckets (8 lengths a doubling: at most 1/8 padding), capped at `limit`. Each length
    compiles its own step: 1,024 to 32,768 are 40 lengths, not 496."""
    step = bucket
    while step * 16 < n:
        step *= 2
    return min(limit, -(-n // step) * step)


def _rows(examples, order, cursor, *, rows, seq_len, pack, most):
    """The next `rows` rows of examples from order[cursor:] -> (rows, cursor after them)."""
    group = []
    while cursor < len(order) and len(group) < rows:
        row, used = [], 0
        while cursor < len(order):
            n = len(examples[order[cursor]].tokens)
            if row and (not pack or used + n > seq_len + 1 or len(row) == most):
                break
            row.append(examples[order[cursor]])
            used, cursor = used + n, cursor + 1
        group.append(row)
    return group, cursor


def _arrays(group, rows: int, length: int):
    """Rows of examples -> tokens, weights, segment_ids, each (rows, length); the examples of a
    row follow each other (segment ids 1, 2, ...), and the rest is padding (segment id 0).
    Rows past the group are all padding."""
    out = [np.zeros((rows, length), dt) for dt in (np.int32, np.float32, np.int32)]
    for i, row in enumerate(group):
        at = 0
        for j, ex in enumerate(row, 1):
            n = len(ex.tokens)
            out[0][i, at:at + n] = ex.tokens
            out[1][i, at:at + n] = ex.weights
            out[2][i, at:at + n] = j
            at += n
    return out


def _most(pack: bool, max_segments: int) -> int | None:
    """The most examples a packed row holds: max_segments - 1 (the padding tail is one run
    more); None: no limit."""
    return max_segments - 1 if pack and max_segments else None


def batches(examples: list[Example], *, rows: int, seq_len: int, pack: bool, seed: int,
            position: tuple[int, int] = (0, 0), bucket: int = 64,
            max_segments: int = jora.Options.max_segments):
    """Endless deterministic batches -> yields (tokens, weights, segment_ids, next_position).

    Each array is (rows, T + 1). The order within epoch e is a permutation drawn from (seed, e);
    `position` = (epoch, examples consumed in it) is where to resume. With `pack`, consecutive
    examples share a row of seq_len + 1 tokens (segment ids 1, 2, ...), at most max_segments - 1
    of them (the padding tail is one run more; 0: no limit): every batch has one shape. Without
    it, one example a row, padded to the batch's longest, T rounded up by padded_length.
    Examples that cannot fill one batch are refused here, at the call, not at the first next().
    """
    def endless(epoch, cursor):
        most = _most(pack, max_segments)
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(len(examples))
            whole, yielded = cursor == 0, False   # an epoch from its start yielding nothing
            while True:
                group, cursor = _rows(examples, order, cursor, rows=rows, seq_len=seq_len,
                                      pack=pack, most=most)
                if len(group) < rows:   # the epoch's tail: start the next epoch instead
                    break
                n = max(sum(len(e.tokens) for e in row) for row in group)
                T1 = 1 + (seq_len if pack else padded_length(n - 1, seq_len, bucket))
                yielded = True
                yield *_arrays(group, rows, T1), (epoch, cursor)
            if whole and not yielded:
                raise ValueError(f"{len(examples)} examples cannot fill one batch of {rows} rows "
                                 f"(--batch-size x --grad-accum)" +
                                 (f" of --seq-len {seq_len} packed tokens" if pack else ""))
            epoch, cursor = epoch + 1, 0

    data = endless(*position)
    return itertools.chain([next(data)], data)


def batches_per_epoch(examples, *, rows: int, seq_len: int, pack: bool, seed: int = 0,
                      max_segments: int = jora.Options.max_segments) -> float:
    """Batches in one pass over `examples` (what --epochs counts); packed: the packer's batches,
    counted by running it. Refuses examples that cannot fill one batch, as `batches` does."""
    data = batches(examples, rows=rows, seq_len=seq_len, pack=pack, seed=seed,
                   max_segments=max_segments)
    if not pack:
        return len(examples) / rows

    def in_first_epoch(batch):   # the data continues in epoch 0 after this batch
        return batch[3][0] == 0

    return sum(1 for _ in itertools.takewhile(in_first_epoch, data))


AUTO_SEQ_LENS = (2048, 4096, 8192, 16384)   # what --seq-len picks from
STEP_POSITIONS = 4096   # packed positions a micro-batch that the default --batch-size aims at
AUTO_SEGMENTS = (8, 16, 32, 64)   # what --max-segments picks from
FULL = 0.9   # the share of positions the default --max-segments fills, where it can


def auto_seq_len(lengths, longest: int) -> int:
    """The shortest of AUTO_SEQ_LENS (at most `longest`, the model's max_positions) whose rows
    hold 99% of the examples whole: an example of n tokens fills n - 1 positions."""
    need = float(np.percentile(np.asarray(lengths) - 1, 99)) if len(lengths) else 0.0
    fit = [n for n in AUTO_SEQ_LENS if n <= longest] or [longest]
    return next((n for n in fit if n >= need), fit[-1])


def auto_eval_split(n: int) -> float:
    """The default held-out share of n examples: 2%, at most 200, none below 100 examples."""
    return 0.0 if n < 100 else min(0.02, 200 / n)


class Prepared(NamedTuple):
    """Examples ready to train on, and the batch shape chosen for them."""
    train: list               # Example
    eval: list                # held out
    per_epoch: float          # batches in one pass over `train`
    seq_len: int              # positions a row
    batch_size: int           # rows a micro-batch
    max_segments: int         # packed rows hold at most max_segments - 1 examples
    eval_split: float


def check_answers(records, fmt: str, path: str, log=print):
    """Refuse a file whose every answer is empty (it would train the end token alone); warn of
    some empty answers, and of RAFT answers without the `<ANSWER>:` tag that scoring reads."""
    if fmt == "chat":   # audit_chat checks conversations
        return
    key = FORMAT_KEYS[fmt][1]
    answers = [r[key] for r in records]
    empty = sum(1 for a in answers if not a.strip())
    if empty == len(answers):
        raise ValueError(f"{path}: every record's '{key}' is empty: training would teach the "
                         f"end token alone")
    if empty:
        log(f"warning: {path}: {empty} of {len(answers)} records have an empty '{key}': they "
            f"train the end token alone")
    untagged = sum(1 for a in answers if "<ANSWER>:" not in a) if fmt == "raft" else 0
    if untagged:
        log(f"warning: {path}: {untagged} of {len(answers)} answers have no '<ANSWER>:' tag: "
            f"scoring (--eval-generate) compares their whole text, not a final answer")


def _used(examples, per_epoch, rows, seq_len) -> float:   # the share of positions examples fill
    return sum(len(e.tokens) for e in examples) / (per_epoch * rows * (seq_len + 1))


def _count_batches(examples, *, rows: int, seq_len: int, pack: bool, seed: int, segments):
    """-> (batches an epoch, max_segments): the first of `segments` whose packed rows are FULL,
    else the last."""
    for m in segments:
        per_epoch = batches_per_epoch(examples, rows=rows, seq_len=seq_len, pack=pack, seed=seed,
                                      max_segments=m)
        if not pack or _used(examples, per_epoch, rows, seq_len) >= FULL:
            break
    return per_epoch, m


def prepare_examples(path: str, fmt: str, tok: jora.Tokenizer, *, seq_len: int | None,
                     eval_split: float | None, seed: int, batch_size: int | None,
                     grad_accum: int = 1, pack: bool, max_segments: int | None = None,
                     max_positions: int = AUTO_SEQ_LENS[-1], data_parallel: int = 1,
                     template: str | None = None, log=print) -> Prepared:
    """Read and tokenize a data file, hold out eval_split of the examples (a permutation drawn
    from seed + 7), and choose what is None: seq_len (auto_seq_len), eval_split
    (auto_eval_split), batch_size (packed: about STEP_POSITIONS positions a micro-batch; else
    8) and max_segments (the least of AUTO_SEGMENTS whose rows are FULL). Refuses, with the
    numbers and the flags that decide them, a split that leaves too few to fill one batch.
    template: the model's chat template, for chat records."""
    records, fmt = read_records(path, fmt)
    check_answers(records, fmt, path, log)
    limit = seq_len or min(AUTO_SEQ_LENS[-1], max_positions)
    if fmt == "chat":
        examples, report, warnings = tokenize_chats(records, tok, template, limit, path, log)
        for line in warnings:
            log(line)
    else:
        examples, report = tokenize_records(records, fmt, tok, limit, path, log)
    if seq_len is None:   # tokenize again only if the length chosen cuts some examples
        seq_len = auto_seq_len([len(e.tokens) for e in examples], limit)
        longer = sum(1 for e in examples if len(e.tokens) > seq_len + 1)
        if longer and fmt == "chat":   # conversations are never cut: the longest are skipped
            examples = [e for e in examples if len(e.tokens) <= seq_len + 1]
            report.update(examples=len(examples), skipped=report["skipped"] + longer)
        elif longer:
            examples, report = tokenize_records(records, fmt, tok, seq_len, path, log)
    log(f"data: {path} ({fmt}) {len(records)} records -> {report}")
    auto_split = eval_split is None
    if auto_split:
        eval_split = auto_eval_split(len(examples))
    n_eval = int(len(examples) * eval_split)
    if eval_split and not n_eval:
        raise ValueError(f"--eval-split {eval_split} of {len(examples)} examples holds out none")
    if auto_split and n_eval:
        log(f"held out {n_eval} examples to evaluate on (--eval-split 0: train on all)")
    split = jax.random.permutation(jax.random.key(seed + 7), len(examples)).tolist()
    train_ex = [examples[i] for i in split[n_eval:]]
    eval_ex = [examples[i] for i in split[:n_eval]]

    auto_rows = batch_size is None
    if auto_rows:   # rounded up to whole rows a data-parallel device
        batch_size = max(1, STEP_POSITIONS // seq_len) if pack else 8
        batch_size = -(-batch_size // data_parallel) * data_parallel
    if not pack:
        segments = [jora.Options.max_segments if max_segments is None else max_segments]
    else:
        segments = list(AUTO_SEGMENTS) if max_segments is None else [max_segments]
    while True:
        try:
            per_epoch, m = _count_batches(train_ex, rows=batch_size * grad_accum,
                                          seq_len=seq_len, pack=pack, seed=seed,
                                          segments=segments)
            break
        except ValueError as e:
            if auto_rows and batch_size > data_parallel:   # too few examples: fewer rows
                batch_size = max(data_parallel, batch_size // 2 // data_parallel * data_parallel)
                continue
            raise ValueError(f"{path}: {len(records)} records, {len(examples)} usable at "
                             f"--seq-len {seq_len}, {n_eval} held out by --eval-split "
                             f"{eval_split}: {e}") from None
    rows = batch_size * grad_accum
    shape = f"{batch_size} rows x {seq_len:,} positions a micro-batch" + (
        f", {grad_accum} micro-batches a step" if grad_accum > 1 else "")
    if pack:
        log(f"batches: {shape}, packed (at most {m - 1 if m else 'any number of'} examples a "
            f"row): {min(_used(train_ex, per_epoch, rows, seq_len), 1):.0%} of positions used, "
            f"{per_epoch:,} batches an epoch; the step compiles for this one shape")
    else:
        lengths = {padded_length(len(e.tokens) - 1, seq_len) for e in train_ex}
        log(f"batches: {batch_size} rows a micro-batch, one example a row padded to the "
            f"batch's longest: up to {len(lengths)} lengths, each compiles the step (--pack: "
            f"one)")
    return Prepared(train_ex, eval_ex, per_epoch, seq_len, batch_size, m, eval_split)


# 2. Scoring RAFT answers ------------------------------------------------------------------------

def extract_answer(text: str) -> str:
    """The final answer of a RAFT chain of thought: the text after the last '<ANSWER>:'."""
    return text.rsplit("<ANSWER>:", 1)[-1].strip()


def _normal_words(text: str) -> list[str]:   # SQuAD's normalisation: case, punctuation, articles
    import re
    import string
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def answer_scores(prediction: str, reference: str) -> dict:
    """Exact match and token F1 (as in SQuAD) of the final answers of two completions."""
    p = _normal_words(extract_answer(prediction))
    r = _normal_words(extract_answer(reference))
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    f1 = 0.0 if not common else 2 * common / (len(p) + len(r))
    return dict(exact_match=float(p == r), token_f1=f1 if p or r else 1.0)


def generate_and_score(params, lora, examples, cfg, lcfg, *, tok, max_new_tokens: int = 256,
                       mesh=None) -> dict:
    """Greedy answers to the prompts of `examples`, scored against their reference answers:
    the prompt is everything before the last trained span (a chat's last assistant turn,
    after its generation prompt), the reference that span."""
    prompts, refs = [], []
    for ex in examples:
        start, stop = _trained_runs(ex.weights)[-1]
        prompts.append(ex.tokens[:start].tolist())
        refs.append(tok.decode(ex.tokens[start:stop]))
    outs = jora.generate(params, prompts, cfg, lora, lcfg, jora.Sampling(max_new_tokens),
                         mesh=mesh)
    scores = [answer_scores(tok.decode(o), r) for o, r in zip(outs, refs)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in ("exact_match", "token_f1")}


# 3. Compiling the step, and remat "auto" --------------------------------------------------------

def use_compile_cache(folder: str | None):
    """jax's persistent compilation cache in `folder` (None: off): steps compiled once are read
    back by later runs. A process-wide setting, so the command lines call it, not the library."""
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def use_device_memory(fraction: float = 0.95):
    """Let jax's GPU client take `fraction` of each GPU's memory rather than its default 75%:
    only so do a 70B model's float8 weights (65 GiB) fit an 80 GB GPU, and remat "auto" finds
    room for faster plans. A process-wide setting read when jax first touches a GPU, so the
    command lines call it, first; XLA_PYTHON_CLIENT_MEM_FRACTION, where the user set it, wins."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(fraction))


def _quiet(*_, **__):   # the print of processes other than 0: they say nothing
    return None


def start_process(args) -> Callable:
    """What a command line sets up before it touches a device (args: model_flags'): the device
    memory jax may take, the compilation cache, and jax.distributed where several hosts run
    -> this process's print (process 0's; the others say nothing)."""
    use_device_memory()
    use_compile_cache(None if args.no_compile_cache else args.compile_cache)
    if args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return print if jax.process_index() == 0 else _quiet


def compile_step(step_fn, args, log=print):
    """step_fn.lower(*args).compile() -> (compiled, seconds), saying how long it took and
    whether jax's persistent compilation cache (jax_compilation_cache_dir, if set) served it."""
    hits = []

    def listen(event, **_):   # counts the persistent cache's hits
        if event.endswith("/cache_hits"):
            hits.append(1)

    jax.monitoring.register_event_listener(listen)
    t = time.time()
    try:
        lowered = step_fn.lower(*args)
        t_lower = time.time() - t
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    spent = time.time() - t
    log(f"compiled in {spent:.1f} s (traced in {t_lower:.1f} s" +
        ("; XLA's part from the compilation cache)" if hits else ")"))
    return compiled, spent


def planned_bytes(compiled) -> int | None:
    """XLA's planned peak device memory for a compiled step (per device), or None."""
    plan = compiled.memory_analysis()
    if plan is None:
        return None
    return (plan.argument_size_in_bytes + plan.temp_size_in_bytes + plan.output_size_in_bytes
            - plan.alias_size_in_bytes)


def describe(plan: jora.Plan) -> str:
    if not plan.mlp_chunk:
        return plan.remat
    chunks = f" + MLP chunks of {plan.mlp_chunk}"
    if plan.chunk_layers:
        chunks += f" in the last {plan.chunk_layers} layers"
    return plan.remat + chunks


# remat "auto" tries these, fastest first, and takes the first whose memory plan fits.
AUTO_PLANS = (dict(remat="none"), dict(remat="min"),
              dict(remat="attn", mlp_chunk=2048, chunk_layers=4),
              dict(remat="attn", mlp_chunk=2048), dict(remat="full", mlp_chunk=2048))


def device_bytes(tree) -> int:
    """Bytes of a pytree's arrays on one device (each array's shard there)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def least_bytes(cfg, plan: jora.Plan, mesh, *, state, params, batch) -> int:
    """A floor under any plan's peak on one device, known without compiling: the weights and
    the training state, plus what the backward keeps for certain of every layer but the first
    (the first may need no input gradient): its input (every remat policy keeps that), and for
    "none" and "min" also the attention's q, k and v (B, T, (N + 2K) H / tp)."""
    tp, dp = mesh.shape[jora.MODEL], mesh.shape[jora.DATA]
    positions = batch.tokens[0].size // dp                 # one micro-batch's, on one device
    if plan.sequence_parallel and tp > 1:
        positions //= tp
    width = cfg.d_model
    if plan.remat in ("none", "min"):
        width += (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim // tp
    kept = (cfg.n_layers - 1) * positions * width * params.embed.dtype.itemsize
    return device_bytes(params) + device_bytes(state) + kept


def choose_plan(cfg, lcfg, tcfg, mesh, *, opts, plan, state, params, batch, key,
                margin: float = 0.9, limit: int | None = None, log=print):
    """remat "auto": the fastest of AUTO_PLANS whose compiled step, at this batch's shape, plans
    at most `margin` of `limit` (default: the device's memory) -> (Plan, step_fn, compiled
    step or None, seconds spent). A plan whose floor (least_bytes) is already over that is
    passed over without compiling (a 70B model's compiles take minutes each). Where no limit
    is known (XLA's CPU backend), the plain plan. The line it logs says why."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    limit = limit or (local.memory_stats() or {}).get("bytes_limit")

    def step_of(p):   # the training step with plan p
        return jora.make_train_step(cfg, lcfg, tcfg, mesh, opts=opts, plan=p)

    if not limit:   # nothing to fit, so nothing to compile yet
        p = dataclasses.replace(plan, **AUTO_PLANS[0])
        log(f"remat auto: {describe(p)} (no device memory limit to fit here)")
        return p, step_of(p), None, 0.0
    tried, spent = [], 0.0
    for auto in AUTO_PLANS:
        if auto.get("chunk_layers") and not jora.unstacked(params.layers):
            continue
        p = dataclasses.replace(plan, **{"mlp_chunk": 0, "chunk_layers": 0, **auto})
        floor = least_bytes(cfg, p, mesh, state=state, params=params, batch=batch)
        if floor > margin * limit and auto is not AUTO_PLANS[-1]:   # no compile can help
            log(f"remat auto: {describe(p)} keeps at least {floor / 2**30:.1f} GiB: skipped")
            tried.append(f"{describe(p)} >= {floor / 2**30:.1f} GiB")
            continue
        log(f"remat auto: compiling the step with {describe(p)} ...")
        compiled, t = compile_step(step_of(p), (state, params, batch, key), log)
        spent += t
        need = planned_bytes(compiled)
        if need is None or need <= margin * limit or auto is AUTO_PLANS[-1]:
            why = (f"plans {(need or 0) / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB" +
                   (f"; {', '.join(tried)} would not fit" if tried else "; the fastest plan"))
            log(f"remat auto: {describe(p)} ({why})")
            return p, step_of(p), compiled, spent
        tried.append(f"{describe(p)} {need / 2**30:.1f} GiB")


PEAK_FLOPS = {"gpu": 800e12}   # measured bf16 matmul rate of one H200; MFU is reported against it


def flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs per token of LoRA training with frozen weights: forward 2N + input-gradients
    2N over the N matmul parameters (lm_head included; no weight gradients), plus causal
    attention 6*T*D*L (forward 2TDL, backward twice that). Recomputation is not counted."""
    n = sum(math.prod(jora.proj_shape(cfg, t)) for t in jora.PROJ) * cfg.n_layers
    n += cfg.d_model * cfg.vocab_size
    return 4 * n + 6 * seq_len * cfg.n_heads * cfg.head_dim * cfg.n_layers


def mfu(flops_per_s: float, devices: int) -> float | None:
    """Model FLOPs utilisation of `devices` against PEAK_FLOPS (None: no peak for this backend)."""
    peak = PEAK_FLOPS.get(jax.default_backend())
    return flops_per_s / (peak * devices) if peak else None


def fp8_transposed(cfg, mesh) -> bool:
    """Whether float8 projections keep transposed copies too (Config.fp8_transposed): on GPUs,
    where both layouts take at most 40% of a device's memory (they then weigh what bf16
    weights would). The copies spare XLA a slow 8-bit transpose of every weight at every step;
    a model too large for them (70B on one GPU) keeps float8's halved weights instead."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if jax.default_backend() != "gpu" or not limit:
        return False
    weights = cfg.n_layers * sum(math.prod(jora.proj_shape(cfg, t)) for t in jora.PROJ)
    return 2 * weights / mesh.shape[jora.MODEL] <= 0.4 * limit


def is_oom(e: Exception) -> bool:   # XLA's out-of-device-memory error
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


LESS_MEMORY = ("To use less: --remat full (or attn, with --full-layers N for the first N layers "
               "full) with --mlp-chunk 2048 (in every layer: no --chunk-layers), a smaller "
               "--batch-size with a larger --grad-accum, a shorter --seq-len, or more devices "
               "(--tp). `python -m bench.benchmark --size 7b --seq-len N --bench-steps 0 ...` "
               "prints XLA's planned peak (planned_gib) without running. Where that plan "
               "fits and the run still fails (the device's memory fragmented), set "
               "XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async.")


# 4. Checkpoints and the run folder --------------------------------------------------------------

def _flat(lora, prefix: str) -> dict:
    return {f"{prefix}.{t}.{part}": getattr(ab, part) for t, ab in lora._asdict().items()
            if ab is not None for part in ("a", "b")}


def save_checkpoint(folder: str, state: jora.TrainState, meta: dict):
    """LoRA factors, AdamW moments and counters (safetensors) + run metadata (JSON); atomic."""
    from safetensors.numpy import save_file
    tensors = {**_flat(state.lora, "lora"), **_flat(state.opt.mu, "mu"),
               **_flat(state.opt.nu, "nu"), "step": state.opt.step, "bad_step": state.bad_step}
    tensors = {k: np.ascontiguousarray(jora.to_host(v)) for k, v in tensors.items()}
    bad = next((k for k, v in tensors.items() if not np.isfinite(v).all()), None)
    if bad:
        raise FloatingPointError(f"{folder}: not saved, tensor '{bad}' is not finite")

    def write(tmp):
        if tmp:
            save_file(tensors, os.path.join(tmp, "state.safetensors"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"format": "jora-train/1", **meta}, f, indent=2)

    jora._atomic_dir(folder, write)


def read_checkpoint(folder: str) -> tuple[dict, dict]:
    """-> (tensors, state.json) of a checkpoint, refusing (ValueError) one that does not read
    back whole or holds a non-finite tensor: a checkpoint is good only if every tensor is."""
    meta = jora.read_json(os.path.join(folder, "state.json"), dict, "a JSON object (jora-train/1)")
    for key in ("step", "data_position"):
        if key not in meta:
            raise ValueError(f"{folder}/state.json: missing field '{key}'")
    t = jora.load_tensors(os.path.join(folder, "state.safetensors"))
    bad = next((k for k, v in t.items() if not np.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"{folder}/state.safetensors: tensor '{bad}' is not finite")
    return t, meta


def load_checkpoint(folder: str, cfg, lcfg, mesh) -> tuple[jora.TrainState, dict]:
    """Inverse of save_checkpoint; refuses a checkpoint of another model or LoRA shape."""
    t, meta = read_checkpoint(folder)
    for key, want in (("config", dataclasses.asdict(cfg)), ("lora", dataclasses.asdict(lcfg))):
        have = meta.get(key, {})
        diff = {k: (have.get(k), v) for k, v in json.loads(json.dumps(want)).items()
                if have.get(k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ValueError(f"{folder}: checkpoint was made with {key}.{k}={a!r}, this run has "
                             f"{b!r} ({len(diff)} difference(s)); use another --out or the same "
                             f"model and LoRA settings")

    def tree(p):
        """The jora.Lora saved under prefix p ("lora", "mu" or "nu")."""
        return jora.Lora(**{x: jora.LoraAB(a=t[f"{p}.{x}.a"], b=t[f"{p}.{x}.b"])
                            for x in lcfg.targets})

    def scalar(name):   # safetensors stores a scalar as shape (1,)
        return t[name].reshape(())

    lora = tree("lora")
    opt = jora.AdamW(scalar("step"), tree("mu"), tree("nu"))
    state = jora.TrainState(lora=lora, opt=opt, bad_step=scalar("bad_step"))
    return jora.shard(state, jora.state_specs(lcfg), mesh), meta


def _steps(out: str, ext=("",)) -> list[str]:   # OUT/checkpoints/step_N(.tmp, .old), sorted
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    paths = []
    for n in sorted(names):
        stem, _, suffix = n.partition(".")
        if stem[:5] == "step_" and stem[5:].isdigit() and suffix in ext:
            paths.append(os.path.join(root, n))
    return paths


def checkpoints(out: str) -> list[str]:   # OUT/checkpoints/step_N folders, oldest first
    return _steps(out)


def latest_checkpoint(out: str) -> str | None:
    return (checkpoints(out) or [None])[-1]


def good_checkpoint(out: str) -> tuple[str | None, list[str]]:
    """-> (the newest checkpoint that read_checkpoint accepts or None, why each newer one is
    not good)."""
    skipped = []
    for path in reversed(checkpoints(out)):
        try:
            read_checkpoint(path)
            return path, skipped
        except (ValueError, OSError) as e:
            skipped.append(str(e))
    return None, skipped


def check_out(out: str, resume: bool = False, overwrite: bool = False):
    """Refuse an `out` holding another run (unless resume or overwrite), and a resume with no
    good checkpoint; -> (the checkpoint to resume from or None, why each newer one is not
    good). Reads only: call it before writing."""
    holds_run = os.path.exists(os.path.join(out, "metrics.jsonl")) or checkpoints(out)
    if holds_run and not (resume or overwrite):
        raise FileExistsError(f"--out {out} holds another run; pass --resume to continue it or "
                              f"--overwrite to start again there")
    if not resume:
        return None, []
    path, skipped = good_checkpoint(out)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}/checkpoints" +
                                (f" reads back whole: {skipped[0]}" if skipped else ""))
    return path, skipped


def resume_info(out: str) -> tuple[str, dict]:
    """-> (the checkpoint a resume starts from, the run_info it was saved with, its steps
    included)."""
    path, _ = check_out(out, resume=True)
    meta = jora.read_json(os.path.join(path, "state.json"))
    return path, dict(meta.get("run") or {}, steps=meta.get("train", {}).get("steps"))


RESUMED = ("model data format tokenizer chat_template seq_len pack max_segments lora_r "
           "lora_alpha lora_dropout targets lr warmup weight_decay clip dtype base_dtype seed "
           "eval_split batch_size grad_accum steps save_every eval_every eval_generate "
           "log_every keep demo").split()


def resume_settings(args, given: set, out: str, say=print):
    """--resume: the run's model, data and settings (RESUMED) from its checkpoint into `args`
    (train.py's flags), except those `given` on the command line, warned about if they differ."""
    path, run = resume_info(out)
    for k in RESUMED:
        if k not in run:
            continue
        if k not in given:
            setattr(args, k, run[k])
        elif run[k] != getattr(args, k):
            say(f"warning: --{k.replace('_', '-')} {getattr(args, k)} differs from the run's "
                f"{run[k]} ({path})")


# What a run writes in OUT, besides checkpoints/step_N (.tmp, .old).
RUN_FILES = ("run.json", "metrics.jsonl", "adapter", "merged")


def run_info(out: str) -> dict | None:
    """The run_info of the run in `out` (from OUT/run.json, else its newest checkpoint): None if
    `out` holds no run, {} if that cannot be read."""
    for f in (os.path.join(out, "run.json"),
              os.path.join(latest_checkpoint(out) or out, "state.json")):
        if os.path.isfile(f):
            try:
                return dict(jora.read_json(f).get("run") or {})
            except (ValueError, OSError):
                return {}
    return {} if os.path.exists(os.path.join(out, "metrics.jsonl")) else None


def clean_run(out: str, extra=()):
    """--overwrite: remove what a run wrote in `out` (RUN_FILES, `extra`, checkpoints/step_N),
    never anything else."""
    names = [n + s for n in RUN_FILES + tuple(extra) for s in ("", ".tmp", ".old")]
    root = os.path.join(out, "checkpoints")
    for path in [os.path.join(out, n) for n in names] + _steps(out, ("", "tmp", "old")):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)


_LOCKS = {}   # lock file -> its open file: the run folders this process holds


def lock_run(out: str) -> bool:
    """One run a folder: take an exclusive flock on OUT/.lock, which the kernel drops when the
    process ends however it ends (kill -9 too). -> False if this process held it already;
    OSError if another process holds it."""
    import fcntl
    path = os.path.abspath(os.path.join(out, ".lock"))
    if path in _LOCKS:
        return False
    os.makedirs(out, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise OSError(f"--out {out} is in use by another run ({who}); wait for it to end or "
                      f"use another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _LOCKS[path] = f
    return True


def unlock_run(out: str):
    f = _LOCKS.pop(os.path.abspath(os.path.join(out, ".lock")), None)
    if f is not None:
        f.close()


def _drop_metrics_after(out: str, step: int) -> int:
    """Resume: remove metric rows past the checkpoint's step (they will be logged again) and a
    row cut short by kill -9; -> how many."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)


def hf_parameters(cfg) -> int:
    """The model's parameters as its HF folder holds them (no lm_head padding; float8 scales
    and transposed copies are not parameters)."""
    def is_shape(x):
        return isinstance(x, tuple) and all(isinstance(n, int) for n in x)

    n = sum(math.prod(s) for s in jax.tree.leaves(jora.param_shapes(cfg), is_leaf=is_shape))
    head = 0 if cfg.tie_embeddings else cfg.vocab_size
    return n - cfg.padded_vocab * cfg.d_model + head * cfg.d_model


def export_run(out: str, cfg, params, lora, lcfg, *, source: str, dtype=jnp.bfloat16,
               log=print):
    """OUT/adapter (PEFT) and OUT/merged (HF). An old merged/ goes first: a crash between the two
    leaves a new adapter/ and no merged/, never a merged/ of other factors beside it."""
    merged = os.path.join(out, "merged")
    t = time.time()
    size = hf_parameters(cfg) * jnp.dtype(dtype).itemsize
    log(f"writing {out}/adapter (PEFT) and {merged} (HF, {jnp.dtype(dtype).name}, "
        f"{size / 2**20:,.0f} MiB) ...")
    if jax.process_index() == 0 and os.path.exists(merged):
        shutil.rmtree(merged)
    jora.export_adapter(os.path.join(out, "adapter"), cfg, lora, lcfg, base_model=source)
    jora.export_merged(merged, cfg, params, lora, lcfg, source=source, dtype=dtype)
    log(f"wrote {out}/adapter and {merged} in {time.time() - t:.1f} s")


# 5. The loop ------------------------------------------------------------------------------------

def evaluate(params, lora, examples, cfg, lcfg, *, mesh, rows: int, seq_len: int,
             opts=jora.Options(), plan=jora.Plan()):
    """Mean answer-token loss over `examples`, one pass in order. Packed (opts.packed), every
    batch has the training step's shape, rows past the last example all padding, so it compiles
    once; else one example a row, padded as `batches` pads them."""
    nll = n = 0.0
    order, cursor = range(len(examples)), 0
    while cursor < len(examples):
        group, cursor = _rows(examples, order, cursor, rows=rows, seq_len=seq_len,
                              pack=opts.packed, most=_most(opts.packed, opts.max_segments))
        longest = max(sum(len(e.tokens) for e in row) for row in group)
        T1 = 1 + (seq_len if opts.packed else padded_length(longest - 1, seq_len))
        tokens, weights, segs = _arrays(group, rows, T1)
        b = jora.shard(jora.make_batch(tokens, weights, segs), jora.batch_specs(), mesh)
        a, c = jora.loss_sums(params, lora, b, cfg, lcfg, opts=opts, plan=plan, mesh=mesh)
        nll, n = nll + float(a), n + float(c)
    return nll / max(n, 1.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a run logs, evaluates and saves, in optimizer steps (0: never)."""
    log_every: int = 10
    eval_every: int = 0       # the held-out loss, also before the first step (0: at the end)
    eval_generate: int = 0    # greedy answers to 8 held-out prompts, scored
    save_every: int = 0       # checkpoints besides the last (and one on a signal or an error)
    keep: int = 3             # checkpoints kept

    def __post_init__(self):
        for name, least in (("log_every", 1), ("save_every", 0), ("eval_every", 0),
                            ("eval_generate", 0), ("keep", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, "
                                 f"got {getattr(self, name)}")


class Run:
    """The state of one run in its folder: the train state, where the data continues, the
    metrics not yet logged, and what the summary holds. Process 0 alone logs and writes."""

    def __init__(self, out, cfg, lcfg, tcfg, *, mesh, schedule: Schedule, log):
        self.out, self.cfg, self.lcfg, self.tcfg, self.mesh = out, cfg, lcfg, tcfg, mesh
        self.schedule = schedule
        self.main = jax.process_index() == 0

        def quiet(*_):   # processes other than 0 say nothing
            return None

        self.log = log if self.main else quiet
        self.state = self.meta = None
        self.locked = False
        self.position, self.start, self.done, self.saved = (0, 0), 0, 0, 0
        self.pending, self.tokens, self.flops = [], 0, 0.0
        self.summary = {}
        self.t0 = self.t_start = time.time()
        # Seconds spent apart from the steps: their clocks (t0, t_start) skip them.
        self.apart = dict(compile=0.0, evaluation=0.0, checkpoint=0.0)
        self.train_s = 0.0    # seconds of training steps, in the rows reported
        self.names = ["loss", "gradient"] + [f"lora.{t}.{p}" for t in lcfg.targets for p in "ab"]

    def count(self, metrics, position, segment_ids):
        """A step done: its metrics (read at the next report), where the data continues after
        it, its tokens and their FLOPs (attention at this batch's length)."""
        self.pending.append(metrics)
        self.position, self.done = position, self.done + 1
        real = int((segment_ids > 0).sum())
        self.tokens += real
        self.flops += real * flops_per_token(self.cfg, segment_ids.shape[1] - 1)

    def record(self, row: dict):   # a line of OUT/metrics.jsonl
        self.summary.update(row)
        if self.main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def stop_if_bad(self):   # a non-finite step: name what went bad and the last good checkpoint
        bad = int(self.state.bad_step)
        if bad:
            finite = [np.asarray(m["finite"]) for m in jax.device_get(self.pending)]
            what = next((self.names[i] for f in finite for i in np.flatnonzero(~f)), "a tensor")
            good = good_checkpoint(self.out)[0]
            raise FloatingPointError(
                f"non-finite {what} at step {bad}; stopped. " +
                (f"The last good checkpoint (every tensor finite) is {good}" if good else
                 "No good checkpoint was saved") + "; a lower --lr or --clip may help")

    def checkpoint(self):   # timed apart from the steps
        self.aside("checkpoint", self._save)

    def _save(self):
        self.stop_if_bad()
        save_checkpoint(os.path.join(self.out, "checkpoints", f"step_{self.done:08d}"),
                        self.state, dict(self.meta, step=self.done,
                                         data_position=list(self.position)))
        for old in (checkpoints(self.out) if self.main else [])[:-self.schedule.keep]:
            shutil.rmtree(old)   # (keep >= 1: never this one)
        self.saved = self.done

    def aside(self, what: str, f, *args):
        """f(*args), timed apart from the steps (`what`: a key of self.apart): tokens/s and
        the ETA count training steps only. -> (f's result, seconds)."""
        jax.block_until_ready(self.state)   # the steps in flight count as training
        t = time.time()
        out = f(*args)
        spent = time.time() - t
        self.apart[what] += spent
        self.t0, self.t_start = self.t0 + spent, self.t_start + spent
        return out, spent

    def report(self):   # a metrics row for the steps since the last: the loop's only host sync
        self.stop_if_bad()
        ms = jax.device_get(self.pending)
        dt = time.time() - self.t0
        tc = self.tcfg
        self.train_s += dt
        row = dict(step=self.done, loss=float(np.mean([x["loss"] for x in ms])),
                   lr=float(ms[-1]["lr"]), grad_norm=float(ms[-1]["grad_norm"]),
                   tokens=self.tokens, tokens_per_s=self.tokens / dt)
        line = (f"step {self.done}/{tc.steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}"
                f"  grad_norm {row['grad_norm']:.3f}  tokens/s {row['tokens_per_s']:,.0f}")
        u = mfu(self.flops / dt, self.mesh.size)
        if u is not None:
            row["mfu"] = u
            line += f"  MFU {u:.1%}"
        eta = (time.time() - self.t_start) / (self.done - self.start) * (tc.steps - self.done)
        self.log(line + f"  ETA {eta / 60:.1f} min")
        self.record(row)
        self.pending, self.tokens, self.flops, self.t0 = [], 0, 0.0, time.time()

    def evaluate(self, params, examples, opts, plan):
        """The held-out loss, timed apart from the steps (its first call compiles)."""
        ev, spent = self.aside("evaluation", functools.partial(
            evaluate, params, self.state.lora, examples, self.cfg, self.lcfg, mesh=self.mesh,
            rows=self.tcfg.batch_size, seq_len=self.tcfg.seq_len, opts=opts, plan=plan))
        self.log(f"step {self.done}/{self.tcfg.steps}  eval_loss {ev:.4f}  "
                 f"perplexity {math.exp(ev):.2f}  ({len(examples)} examples in {spent:.1f} s)")
        self.record(dict(step=self.done, eval_loss=ev, eval_perplexity=math.exp(ev),
                         eval_s=round(spent, 3)))

    def score(self, params, examples, tokenizer):
        """Greedy answers to 8 held-out prompts, scored, timed apart from the steps."""
        s, spent = self.aside("evaluation", functools.partial(
            generate_and_score, params, self.state.lora, examples[:8], self.cfg, self.lcfg,
            tok=tokenizer, mesh=self.mesh))
        self.log(f"step {self.done}/{self.tcfg.steps}  exact_match {s['exact_match']:.3f}  "
                 f"token_f1 {s['token_f1']:.3f}  (8 answers in {spent:.1f} s)")
        self.record(dict(step=self.done, **s, eval_s=round(spent, 3)))

    def save_on_error(self, e: Exception):
        """A crash (out of memory at a new length, ...): keep the steps done, if their state
        survived (a failed step may have consumed its donated input). With several processes
        the others may be gone, so they cannot save together."""
        if (self.done > self.saved and not isinstance(e, FloatingPointError)
                and jax.process_count() == 1
                and not any(x.is_deleted() for x in jax.tree.leaves(self.state))):
            if self.pending:   # the steps since the last row: their metrics too
                self.report()
            self.checkpoint()
            self.log(f"stopped by an error after step {self.done}: checkpoint saved; continue "
                     f"with --resume")


def _start(run: Run, examples, *, opts, resume, overwrite, run_info, pack, plan):
    """Check everything, then take OUT's lock and set up a fresh or resumed state -> the data."""
    cfg, lcfg, tcfg, mesh, out = run.cfg, run.lcfg, run.tcfg, run.mesh, run.out
    path, skipped = check_out(out, resume, overwrite)   # all is checked before anything is written
    jora.check_tp(cfg, mesh.shape[jora.MODEL])
    if tcfg.batch_size % mesh.shape[jora.DATA]:
        raise ValueError(f"--batch-size {tcfg.batch_size} must be a multiple of the data-parallel "
                         f"size {mesh.shape[jora.DATA]}")
    run.meta = dict(config=dataclasses.asdict(cfg), lora=dataclasses.asdict(lcfg),
                    train=dataclasses.asdict(tcfg), opts=dataclasses.asdict(opts),
                    plan=dataclasses.asdict(plan), pack=pack, run=run_info or {})
    if resume:
        run.state, saved = load_checkpoint(path, cfg, lcfg, mesh)
        run.position = tuple(saved["data_position"])
        run.start = int(saved["step"])
    data = batches(examples, rows=tcfg.batch_size * tcfg.grad_accum, seq_len=tcfg.seq_len,
                   pack=pack, seed=tcfg.seed, position=run.position,
                   max_segments=opts.max_segments)   # refuses here
    run.locked = run.main and lock_run(out)
    run.done = run.saved = run.start
    if resume:
        for why in skipped:
            run.log(f"warning: {why}; resuming from the checkpoint before it")
        dropped = _drop_metrics_after(out, run.start) if run.main else 0
        run.log(f"resumed from {path} at step {run.start}" +
                (f" (dropped {dropped} metric rows logged after it)" if dropped else ""))
        return data
    if overwrite and run.main:
        clean_run(out)
    if run.main:   # what this run is: checkpoints repeat it; the demo looks here
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(run.meta, f, indent=2)
    lora = jora.init_lora(jax.random.key(tcfg.seed), cfg, lcfg)
    run.state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), jnp.zeros((), jnp.int32)),
                           jora.state_specs(lcfg), mesh)
    return data


@contextlib.contextmanager
def _signals():
    """-> a list that SIGINT or SIGTERM appends to: the first asks the loop for a checkpoint
    after the step in flight, a second stops at once (KeyboardInterrupt)."""
    interrupted, handlers = [], {}

    def on_signal(sig, frame):   # (no print here: the signal may have come in the middle of one)
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:   # not the main thread: no handlers, no graceful stop
            pass
    try:
        yield interrupted
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _step_fn(run: Run, params, key, *, opts, plan):
    """-> (plan, step_fn, {tokens' shape: compiled step}); remat "auto" decides the plan at the
    longest rows the data can make, compiling them."""
    cfg, lcfg, tcfg, mesh = run.cfg, run.lcfg, run.tcfg, run.mesh
    if plan.remat != "auto":
        return plan, jora.make_train_step(cfg, lcfg, tcfg, mesh, opts=opts, plan=plan), {}
    rows = tcfg.batch_size * tcfg.grad_accum
    full = jora.accum_batch(jora.make_batch(np.zeros((rows, tcfg.seq_len + 1), np.int32)),
                            tcfg.grad_accum, mesh)
    plan, step_fn, step, spent = choose_plan(cfg, lcfg, tcfg, mesh, opts=opts, plan=plan,
                                             state=run.state, params=params, batch=full,
                                             key=key, log=run.log)
    run.apart["compile"] += spent
    run.meta["plan"] = dataclasses.asdict(plan)
    return plan, step_fn, {(rows, tcfg.seq_len + 1): step} if step else {}


def train(cfg, params, lcfg, tcfg, examples, out: str, mesh, *, eval_examples=(),
          opts: jora.Options = jora.Options(), plan: jora.Plan = jora.Plan(), pack: bool = False,
          schedule: Schedule = Schedule(), resume: bool = False, overwrite: bool = False,
          run_info: dict | None = None, tokenizer=None, log=print):
    """Fine-tune LoRA adapters on `examples` -> (trained jora.Lora, summary dict).

    Writes OUT/metrics.jsonl (one JSON object per log or eval row) and OUT/checkpoints/step_N
    as `schedule` says, on SIGINT/SIGTERM and at the end; holds OUT's lock while it writes. A
    signal stops after the step in flight with a checkpoint (summary["interrupted"] = the step,
    ["signal"] = the signal); a second one stops at once (KeyboardInterrupt). resume=True
    continues from the newest good checkpoint exactly (same data order, dropout masks and
    optimizer state). plan.remat "auto" picks the plan at the longest rows (choose_plan).
    schedule.eval_generate needs `tokenizer`, to score the decoded answers.
    """
    opts = dataclasses.replace(opts, packed=pack)
    s = schedule
    run = Run(out, cfg, lcfg, tcfg, mesh=mesh, schedule=s, log=log)
    data = _start(run, examples, opts=opts, resume=resume, overwrite=overwrite,
                  run_info=run_info, pack=pack, plan=plan)
    key = jax.random.key(tcfg.seed + 1)   # dropout: step s uses fold_in(key, s)
    try:
        plan, step_fn, compiled = _step_fn(run, params, key, opts=opts, plan=plan)
        with _signals() as interrupted:
            if s.eval_every and eval_examples and run.start == 0:
                run.evaluate(params, eval_examples, opts, plan)   # the baseline of later ones
            if interrupted:   # a signal before the first step: nothing to save, stop now
                raise KeyboardInterrupt
            run.t0 = run.t_start = time.time()
            for step in range(run.start, tcfg.steps):
                tokens, weights, segs, after = next(data)
                b = jora.accum_batch(jora.make_batch(tokens, weights, segs), tcfg.grad_accum,
                                     mesh)
                if tokens.shape not in compiled:
                    # A new shape (once when packed): minutes for 7B at long T, seconds from
                    # the compilation cache; compiled in view, off the steps' clocks.
                    run.log(f"compiling the training step for {tokens.shape[0]} rows x "
                            f"{tokens.shape[1] - 1} positions ...")
                    (step_now, _), _ = run.aside(
                        "compile", compile_step, step_fn, (run.state, params, b, key), run.log)
                    compiled[tokens.shape] = step_now
                run.state, m = compiled[tokens.shape](run.state, params, b, key)
                run.count(m, after, segs)
                done = run.done
                if step == run.start:   # the time to the first step: the run's start-up cost
                    jax.block_until_ready(m)
                    run.summary["first_step_done"] = time.time()
                if done % s.log_every == 0 or done == tcfg.steps or interrupted:
                    run.report()
                if eval_examples and ((s.eval_every and done % s.eval_every == 0)
                                      or done == tcfg.steps):
                    run.evaluate(params, eval_examples, opts, plan)
                if s.eval_generate and eval_examples and done % s.eval_generate == 0:
                    run.score(params, eval_examples, tokenizer)
                if interrupted:
                    run.checkpoint()
                    run.log(f"interrupted at step {done}: checkpoint saved; continue with "
                            f"--resume")
                    run.summary.update(interrupted=done, signal=interrupted[0])
                    return run.state.lora, run.summary
                if s.save_every and done % s.save_every == 0 and done < tcfg.steps:
                    run.checkpoint()
        run.checkpoint()
    except Exception as e:
        run.save_on_error(e)
        raise
    finally:
        if run.locked:
            unlock_run(out)
    run.summary.update(train_s=round(run.train_s, 3),
                       **{f"{k}_s": round(v, 3) for k, v in run.apart.items()})
    return run.state.lora, run.summary


# 6. Flags that train.py and bench/benchmark.py share --------------------------------------------

class Number(NamedTuple):
    """A numeric flag: its default and the interval its value must lie in (NaN lies in none).
    default None: no default, or one chosen at the start of a run from the model and the data."""
    default: int | float | None
    least: float = -math.inf
    most: float = math.inf
    above_least: bool = False     # the value must be > least, not only >= least
    below_most: bool = False      # the value must be < most, not only <= most
    kind: type = int              # what the command line's text is read as

    def check(self, flag: str, value):
        low_ok = value > self.least if self.above_least else value >= self.least
        # Unbounded above still means finite: --lr inf is refused.
        below = self.below_most or self.most == math.inf
        high_ok = value < self.most if below else value <= self.most
        if low_ok and high_ok:
            return
        if self.most == math.inf:
            want = f"> {self.least:g}" if self.above_least else f">= {self.least:g}"
        else:
            want = (f"in {'(' if self.above_least else '['}{self.least:g},{self.most:g}"
                    f"{')' if self.below_most else ']'}")
        raise ValueError(f"{flag} must be {want}, got {value}")


def at_least(n, least=1):
    return Number(n, least, kind=float if isinstance(n, float) else int)


def positive(x):
    return Number(x, 0, above_least=True, kind=float)


def fraction(x):   # in [0, 1)
    return Number(x, 0, 1, below_most=True, kind=float)


# The numeric flags of train.py and the benchmark; --help lists each with its default.
NUMBERS = dict(
    batch_size=at_least(None), grad_accum=at_least(1), lora_r=at_least(16),
    lora_alpha=positive(16.0), lora_dropout=fraction(0.05), tp=at_least(1),
    loss_chunk=at_least(2048), mlp_chunk=at_least(0, 0), full_layers=at_least(0, 0),
    chunk_layers=at_least(0, 0), max_segments=at_least(None, 0),
    steps=at_least(None), epochs=positive(1.0), seq_len=at_least(None), lr=positive(2e-4),
    warmup=at_least(10, 0), weight_decay=at_least(0.0, 0), clip=at_least(1.0, 0),
    seed=at_least(0, 0), eval_split=fraction(None), save_every=at_least(0, 0),
    eval_every=at_least(0, 0), eval_generate=at_least(0, 0), log_every=at_least(10),
    keep=at_least(3), max_new_tokens=at_least(256), temperature=at_least(0.0, 0),
    top_k=at_least(0, 0), top_p=Number(1.0, 0, 1, above_least=True, kind=float))

HELP = dict(   # README's table says what every flag is for
    batch_size="rows a micro-batch (default: packed rows of about 4,096 positions a "
               "micro-batch; without packing 8)",
    seq_len="positions a row (default: the shortest of 2,048, 4,096, 8,192 and 16,384 that "
            "holds 99%% of the examples whole, at most the model's max_position_embeddings)",
    max_segments="packed rows: at most N - 1 examples a row, whose offsets cuDNN attends "
                 "within (default: the least of 8, 16, 32, 64 that fills 90%% of the "
                 "positions; 0: a (T, T) mask)",
    eval_split="fraction of the examples held out for evaluation (default: 2%%, at most 200, "
               "none below 100 examples)",
    eval_every="also evaluate every N steps, and before the first (default: at the end only)",
    mlp_chunk="positions per MLP chunk (0: all)", tp="devices per tensor-parallel group",
    chunk_layers="with --mlp-chunk: only the last N layers chunk their MLP (0: all)",
    full_layers="the first N layers remat full whatever --remat says",
    steps="optimizer steps (default: --epochs)",
    eval_generate="every N steps, score answers to 8 held-out prompts",
    epochs="passes over the training examples")


def number_flag(add_argument, name: str):
    spec = NUMBERS[name]
    add_argument("--" + name.replace("_", "-"), type=spec.kind, default=spec.default,
                 help=HELP.get(name, "") + " (%(default)s)")


def check_numbers(args):
    """Every numeric flag that is set lies in its interval: ValueError naming the flag."""
    for name, spec in NUMBERS.items():
        value = getattr(args, name, None)
        if value is not None:
            spec.check("--" + name.replace("_", "-"), value)


def model_flags(add_argument):
    """The flags train.py and bench/benchmark.py share: the model, LoRA and the devices."""
    a = add_argument
    for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "lora_dropout", "tp",
                 "loss_chunk", "mlp_chunk", "full_layers", "chunk_layers", "max_segments"):
        number_flag(a, name)
    a("--targets", default="q,v", help="any of q,k,v,o,gate,up,down, or 'all'")
    a("--remat", default="auto", choices=["auto", *jora.REMAT],
      help="what the backward keeps (auto: the fastest plan whose memory fits the device, "
           "said at start)")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "jora", "xla")
    a("--compile-cache", default=cache,
      help="jax's persistent compilation cache (default: %(default)s)")
    a("--no-compile-cache", action="store_true", help="compile every run afresh")
    a("--attention", default="auto", choices=["auto", "cudnn", "xla"])
    a("--kernels", default="auto", choices=["auto", "pallas", "xla"],
      help="LoRA projections: the fused Pallas kernels of kernels/ or XLA (auto: the Mosaic "
           "GPU kernel on Hopper GPUs where the shapes fit, else XLA)")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--base-dtype", choices=["float8"],
      help="the frozen projections' dtype (default: --dtype's). float8: e4m3 with a scale per "
           "output channel, quantized on the devices as the model loads, in FP8 GEMMs on "
           "Hopper GPUs; the adapter, attention, norms, the loss and exports stay as they are")
    a("--sequence-parallel", action="store_true", help="split positions over the tp group")
    a("--coordinator", help="host:port of process 0, for several hosts")
    for flag in ("--num-processes", "--process-id"):
        a(flag, type=int)


def configs(args):
    """-> (LoraConfig, Options, Plan) from the flags (an unset --max-segments: Options')."""
    targets = jora.PROJ if args.targets == "all" else tuple(args.targets.split(","))
    lcfg = jora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           targets=targets)

    def given(cls):   # the fields of a config class that have a flag with a value
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if getattr(args, f.name, None) is not None}

    return lcfg, jora.Options(**given(jora.Options)), jora.Plan(**given(jora.Plan))
