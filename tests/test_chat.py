"""Chat data: trainer's chat_template, render_chat, chat_messages, chat_example, audit_chat and
mark_spans, against the real templates in ../shared/data/chat_templates (each rendered sample
byte for byte, each trained span down to its end token) with the real tokenizers, and every
refusal and warning of the audit."""
import datetime
import functools
import json
import os
import re

import numpy as np
import pytest
from conftest import DATA, needs_data

jinja2 = pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

import jora  # noqa: E402
import trainer  # noqa: E402

TEMPLATES = os.path.join(DATA, "chat_templates")
FIXED = datetime.datetime(2024, 7, 26)   # the date the samples were rendered with (README)
QWEN3_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")   # 151665…151668
# template -> (tokenizer folder, the token that ends an assistant turn)
MODELS = {"Llama-3.1-8B-Instruct": ("llama3", "<|eot_id|>"),
          "Llama-3.2-1B-Instruct": ("llama3", "<|eot_id|>"),
          "Qwen2.5-7B-Instruct": ("qwen2.5", "<|im_end|>"),
          "Qwen3-8B": ("qwen2.5", "<|im_end|>"),
          "Mistral-7B-Instruct-v0.3": ("mistral-v0.3", "</s>"),
          "Llama-2-7b-chat-hf": ("llama2", "</s>")}
ANSWER = "The capital of France is Paris."
# The trained text of the sample, exactly: the content and its end token, with the whitespace
# that the template joins to them (Mistral's ' ' + content is one token, ▁The; Llama-2 writes
# ' ' + content + ' ' + </s>). Never the template's text: headers, Qwen3's empty think block,
# Qwen's '\n' after <|im_end|>.
SAMPLE_SPAN = {"Llama-3.1-8B-Instruct": ANSWER + "<|eot_id|>",
               "Llama-3.2-1B-Instruct": ANSWER + "<|eot_id|>",
               "Qwen2.5-7B-Instruct": ANSWER + "<|im_end|>",
               "Qwen3-8B": ANSWER + "<|im_end|>",
               "Mistral-7B-Instruct-v0.3": " " + ANSWER + "</s>",
               "Llama-2-7b-chat-hf": " " + ANSWER + " </s>"}
DROPS_SYSTEM = "the chat template drops the system message"
NOT_PREFIX = "the generation prompt"
MULTI = [{"role": "system", "content": "Answer in one short sentence."},
         {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "It is 4."},
         {"role": "user", "content": "And 3 + 3, in words?"},
         {"role": "assistant", "content": "Six, of course."}]


@functools.lru_cache(maxsize=None)
def tokenizer(name: str) -> jora.Tokenizer:
    """The tokenizer of a template (a fresh object per template: Qwen3's adds 4 tokens)."""
    tok = jora.Tokenizer(os.path.join(DATA, MODELS[name][0]))
    if name == "Qwen3-8B":   # Qwen3's vocab is Qwen2.5's plus 4 added, non-special tokens
        tok.hf.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                           for t in QWEN3_TOKENS])
        tok.vocab_size += len(QWEN3_TOKENS)
    return tok


def template(name: str) -> str:
    """What --chat-template passes for each model: the .jinja file (the llama3, mistral-v0.3
    and llama2 folders have no chat template; qwen2.5's config holds Qwen2.5's)."""
    return trainer.chat_template(os.path.join(DATA, MODELS[name][0]),
                                 os.path.join(TEMPLATES, name + ".jinja"))


def sample() -> dict:
    with open(os.path.join(TEMPLATES, "sample_conversation.json")) as f:
        return json.load(f)


def spans(example, tok) -> list[str]:
    """The trained texts, as mark_spans shows them."""
    return re.findall("\u27e6(.*?)\u27e7", trainer.mark_spans(example, tok), re.S)


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


# Templates and rendering ------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_renders_each_sample_byte_for_byte(name):
    conv = sample()
    with open(os.path.join(TEMPLATES, name + ".sample.txt"), encoding="utf-8") as f:
        want = f.read()
    given = conv["special_tokens"][name]
    bos, eos = trainer.chat_special_tokens(tokenizer(name))
    for bos_token, eos_token in ((given["bos_token"], given["eos_token"]), (bos, eos)):
        assert trainer.render_chat(template(name), conv["messages"], bos_token=bos_token,
                                   eos_token=eos_token, now=FIXED) == want


@needs_data
def test_special_token_strings_come_from_the_tokenizer_folder():
    # tokenizer_config.json's bos_token/eos_token (Qwen: bos null), else sentencepiece pieces.
    # The Llama-3 folder is the base model's (eos <|end_of_text|>); its templates write
    # <|eot_id|> themselves and never read eos_token.
    assert trainer.chat_special_tokens(tokenizer("Llama-3.1-8B-Instruct")) == (
        "<|begin_of_text|>", "<|end_of_text|>")
    assert trainer.chat_special_tokens(tokenizer("Qwen2.5-7B-Instruct")) == (None, "<|im_end|>")
    assert trainer.chat_special_tokens(tokenizer("Mistral-7B-Instruct-v0.3")) == ("<s>", "</s>")
    assert trainer.chat_special_tokens(tokenizer("Llama-2-7b-chat-hf")) == ("<s>", "</s>")
    tok = tokenizer("Qwen3-8B")
    assert [tok.hf.token_to_id(t) for t in QWEN3_TOKENS] == [151665, 151666, 151667, 151668]


@needs_data
def test_chat_template_sources():
    with open(os.path.join(TEMPLATES, "Qwen2.5-7B-Instruct.jinja"), encoding="utf-8") as f:
        qwen = f.read()
    assert trainer.chat_template(os.path.join(DATA, "qwen2.5")) == qwen   # tokenizer_config
    assert trainer.chat_template(os.path.join(DATA, "qwen2.5", "tokenizer.json")) == qwen
    assert trainer.chat_template(os.path.join(DATA, "llama3")) is None    # base model: none
    assert trainer.chat_template(os.path.join(DATA, "mistral-v0.3")) is None   # no config


def test_chat_template_precedence(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    assert trainer.chat_template(str(tmp_path)) is None
    config.write_text(json.dumps({"eos_token": "</s>"}))
    assert trainer.chat_template(str(tmp_path)) is None
    config.write_text(json.dumps({"chat_template": "from config"}))
    assert trainer.chat_template(str(tmp_path)) == "from config"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "tools"},
                                                    {"name": "default", "template": "plain"}]}))
    assert trainer.chat_template(str(tmp_path)) == "plain"
    (tmp_path / "chat_template.jinja").write_text("from jinja\n")
    assert trainer.chat_template(str(tmp_path)) == "from jinja\n"   # exact bytes
    (tmp_path / "mine.jinja").write_text("override")
    assert trainer.chat_template(str(tmp_path), str(tmp_path / "mine.jinja")) == "override"
    with pytest.raises(ValueError, match="--chat-template .*nope.jinja: no such file"):
        trainer.chat_template(str(tmp_path), str(tmp_path / "nope.jinja"))
    (tmp_path / "chat_template.jinja").unlink()
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "t"}]}))
    with pytest.raises(ValueError, match="without one named 'default'.*tool_use"):
        trainer.chat_template(str(tmp_path))


def test_render_chat_environment():
    render = functools.partial(trainer.render_chat, bos_token="<s>", eos_token="</s>", now=FIXED)
    # trim_blocks and lstrip_blocks
    assert render("{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n"
                  "{% endfor %}", [{"role": "user", "content": "a"}]) == "a\n"
    # transformers' tojson: no ASCII escapes, no HTML escapes, key order kept, indent
    assert render("{{ {'b': 'é<&', 'a': 1} | tojson }}", []) == '{"b": "é<&", "a": 1}'
    assert render("{{ [1] | tojson(indent=2) }}", []) == "[\n  1\n]"
    assert render("{{ strftime_now('%d %b %Y') }}", []) == "26 Jul 2024"
    assert render("{{ bos_token }}{% if add_generation_prompt %}go{% endif %}{{ eos_token }}",
                  [], add_generation_prompt=True) == "<s>go</s>"
    # loop controls, and transformers' {% generation %} block (rendered as is)
    assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}"
                  "{% endfor %}{% generation %}G{% endgeneration %}", []) == "1G"
    with pytest.raises(ValueError, match="^roles must alternate$"):
        render("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):   # sandboxed
        render("{{ messages.append(1) }}", [])


@needs_data
def test_a_template_refusal_names_the_record():
    users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="must alternate"):   # the template's own message
        trainer.render_chat(template("Mistral-7B-Instruct-v0.3"), users, bos_token="<s>",
                            eos_token="</s>")
    tok = tokenizer("Llama-3.1-8B-Instruct")
    with pytest.raises(ValueError, match=r"^x\.json: record 3: the chat template refuses it: "
                                         r"no thanks$"):
        trainer.chat_example(sample()["messages"], tok, "{{ raise_exception('no thanks') }}",
                             record=3, path="x.json")


# Records -> messages -----------------------------------------------------------------------------

def test_chat_messages_reads_both_formats():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}]
    assert trainer.chat_messages({"messages": messages, "id": 7}, 1, "d.json") == messages
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                               {"from": "gpt", "value": "a"}]}
    assert trainer.chat_messages(share, 1, "d.json") == messages
    share = {"conversations": [{"from": "user", "value": "u"},
                               {"from": "assistant", "value": "a"}]}
    assert trainer.chat_messages(share, 1, "d.json") == messages[1:]


@pytest.mark.parametrize("record, error", [
    ({"text": "hi"}, "record 4 has neither 'messages' nor 'conversations'"),
    ({"messages": "hi"}, "record 4 field 'messages' is a JSON string, not a list of messages"),
    ({"messages": [["user", "hi"]]}, r"record 4 messages\[1\] is a JSON list, not an object"),
    ({"messages": [{"content": "hi"}]}, r"record 4 messages\[1\] has no 'role'"),
    ({"messages": [{"role": "user", "content": None}]},
     r"record 4 messages\[1\] field 'content' is null, not a string"),
    ({"conversations": [{"from": "human", "text": "hi"}]},
     r"record 4 conversations\[1\] has no 'value'"),
    ({"messages": [{"role": "tool", "content": "{}"}]},
     r"record 4 messages\[1\] has role 'tool'; expected one of system, user, assistant"),
    ({"conversations": [{"from": "bot", "value": "x"}]},
     r"record 4 conversations\[1\] has from 'bot'; expected one of system, human"),
    ({"messages": []}, "record 4 has no messages"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
     "record 4 message 1 is 'assistant' where 'user' was expected"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]},
     "record 4 message 2 is 'user' where 'assistant' was expected"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]},
     "record 4 message 2 is 'system' where 'assistant' was expected"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
     "record 4 has no assistant message"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " \n"}]},
     r"record 4 messages\[2\] is an empty assistant message"),
])
def test_chat_messages_refusals(record, error):
    with pytest.raises(ValueError, match="^d.json: " + error) as e:
        trainer.chat_messages(record, 4, "d.json")
    assert "\n" not in str(e.value)


# Examples: the trained spans ---------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_sample_trains_exactly_the_answer_and_its_end_token(name):
    tok, conv = tokenizer(name), sample()
    example, info = trainer.chat_example(conv["messages"], tok, template(name), record=1,
                                         path="s.json")
    assert example.tokens.dtype == np.int32 and example.weights.dtype == np.float32
    assert spans(example, tok) == [SAMPLE_SPAN[name]]
    trained = example.tokens[example.weights > 0]
    assert trainer.token_text(tok, trained) == SAMPLE_SPAN[name]
    assert trained[-1] == trainer.encode_rendered(tok, MODELS[name][1])[0]
    assert set(np.unique(example.weights)) == {0, 1}
    # The tokens are the rendered sample's (Llama-3.2 asks the clock for today's date).
    with open(os.path.join(TEMPLATES, name + ".sample.txt"), encoding="utf-8") as f:
        want = f.read()
    if name == "Llama-3.2-1B-Instruct":
        today = datetime.datetime.now().strftime("%d %b %Y")
        want = want.replace("Today Date: 26 Jul 2024", "Today Date: " + today)
    assert info["text"] == want
    if tok.sp is None:   # tokenizers: ids decode back to the text exactly
        assert trainer.token_text(tok, example.tokens) == info["text"]
    warnings = trainer.audit_chat(example, conv["messages"], tok, template(name), record=1,
                                  path="s.json")
    assert warnings == info["warnings"]
    if name.startswith("Mistral"):   # ends with the assistant: the system prompt is dropped
        assert len(warnings) == 2 and warnings[0].startswith(DROPS_SYSTEM)
        assert warnings[1].startswith(NOT_PREFIX)
    else:
        assert warnings == []


@needs_data
def test_sample_ids_are_the_references():
    conv = sample()
    ids = {name: trainer.chat_example(conv["messages"], tokenizer(name), template(name),
                                      record=1, path="s.json")[0].tokens.tolist()
           for name in MODELS}
    # ../shared/data/llama3/README.md and qwen2.5/README.md: one BOS, never two.
    llama3 = ids["Llama-3.1-8B-Instruct"]
    assert len(llama3) == 56 and llama3[:5] == [128000, 128006, 9125, 128007, 271]
    assert llama3[-4:] == [374, 12366, 13, 128009]
    qwen = ids["Qwen2.5-7B-Instruct"]
    assert len(qwen) == 35 and qwen[:4] == [151644, 8948, 198, 2610]
    assert qwen[-4:] == [12095, 13, 151645, 198]
    qwen3 = ids["Qwen3-8B"]   # <think> and </think> as the ids Qwen3 has for them
    assert 151667 in qwen3 and 151668 in qwen3
    # sentencepiece: control-token text becomes its id. Mistral v0.3 as mistral-common encodes
    # it ([INST] ▁What … [/INST] ▁The … </s>), Llama-2 as Meta's chat code does (BOS, the
    # turn's text with sentencepiece's leading space, EOS).
    sp = tokenizer("Mistral-7B-Instruct-v0.3").sp
    assert ids["Mistral-7B-Instruct-v0.3"] == [1, 3, *sp.encode(conv["messages"][1]["content"]),
                                               4, *sp.encode(ANSWER), 2]
    sp = tokenizer("Llama-2-7b-chat-hf").sp
    assert ids["Llama-2-7b-chat-hf"] == [1, *sp.encode(
        "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
        "What is the capital of France? [/INST] " + ANSWER + " "), 2]


@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_multi_turn_trains_every_assistant_turn(name):
    tok = tokenizer(name)
    example, info = trainer.chat_example(MULTI, tok, template(name), record=2, path="m.json")
    end = MODELS[name][1]
    got = spans(example, tok)
    assert [squeeze(s) for s in got] == [squeeze(m["content"] + end) for m in MULTI[2::2]]
    assert all(s.endswith(end) for s in got)
    assert info["methods"] == ["sentinel", "sentinel"]
    warnings = trainer.audit_chat(example, MULTI, tok, template(name), record=2, path="m.json")
    if name.startswith("Mistral"):
        assert len(warnings) == 2 and warnings[0].startswith(DROPS_SYSTEM)
        assert warnings[1].startswith(NOT_PREFIX)
    else:
        assert warnings == []
    # Without a system message, Mistral's conversation is a prefix again, and nothing is lost.
    example, info = trainer.chat_example(MULTI[1:], tok, template(name), record=2,
                                         path="m.json")
    assert [squeeze(s) for s in spans(example, tok)] == [squeeze(m["content"] + end)
                                                         for m in MULTI[2::2]]
    assert info["warnings"] == []


@needs_data
def test_a_final_user_message_is_context_only():
    # Allowed, untrained; the generation prompt checked is the last assistant turn's.
    messages = MULTI + [{"role": "user", "content": "Thanks!"}]
    for name in ("Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.3"):
        tok = tokenizer(name)
        example, info = trainer.chat_example(messages, tok, template(name), record=1,
                                             path="f.json")
        assert len(spans(example, tok)) == 2 and "Thanks!" not in "".join(spans(example, tok))
        if name.startswith("Llama"):
            assert info["warnings"] == []
        else:   # Mistral writes the system prompt into the final user turn: kept, but moved
            assert len(info["warnings"]) == 1 and info["warnings"][0].startswith(NOT_PREFIX)


@needs_data
def test_untrimmed_content_is_trained_as_the_template_writes_it():
    # Qwen keeps the content's whitespace; Llama-3 trims it; Llama-2 strips it.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Yes.\n"}]
    for name, want in (("Qwen2.5-7B-Instruct", "  Yes.\n<|im_end|>"),
                       ("Llama-3.1-8B-Instruct", "Yes.<|eot_id|>"),
                       ("Llama-2-7b-chat-hf", " Yes. </s>")):
        example, _ = trainer.chat_example(messages, tokenizer(name), template(name), record=1,
                                          path="w.json")
        assert spans(example, tokenizer(name)) == [want]


@needs_data
def test_qwen3_reasoning():
    # A final turn's <think> reasoning becomes the template's own think block: the turn is
    # trained from its generation prompt on (reasoning and answer, as the model writes them).
    # An earlier turn's reasoning is dropped by the template: only its answer is trained.
    name, tok = "Qwen3-8B", tokenizer("Qwen3-8B")
    messages = [{"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nIt is 4."},
                {"role": "user", "content": "3 + 3?"},
                {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\nIt is 6."}]
    example, info = trainer.chat_example(messages, tok, template(name), record=1, path="q.json")
    assert spans(example, tok) == ["It is 4.<|im_end|>",
                                   "<think>\nAdd again.\n</think>\n\nIt is 6.<|im_end|>"]
    assert info["methods"] == ["sentinel", "prefix"]
    assert trainer.audit_chat(example, messages, tok, template(name), record=1,
                              path="q.json") == []


# The audit: each refusal and each warning -------------------------------------------------------

def _llama3_sample():
    name = "Llama-3.1-8B-Instruct"
    tok, messages = tokenizer(name), sample()["messages"]
    example, _ = trainer.chat_example(messages, tok, template(name), record=5, path="a.json")
    return tok, messages, template(name), example


@needs_data
def test_audit_refuses_an_untrained_end_token():
    tok, messages, tpl, example = _llama3_sample()
    weights = example.weights.copy()
    weights[-1] = 0   # <|eot_id|>
    with pytest.raises(ValueError, match=r"^a\.json: record 5 message 3 \(assistant\): its "
                                         r"end-of-turn token '<\|eot_id\|>' is untrained$"):
        trainer.audit_chat(trainer.Example(example.tokens, weights), messages, tok, tpl,
                           record=5, path="a.json")


@needs_data
def test_audit_refuses_an_absent_end_token():
    tok, messages, tpl, example = _llama3_sample()
    cut = trainer.Example(example.tokens[:-1], example.weights[:-1])
    with pytest.raises(ValueError, match=r"^a\.json: record 5 message 3 \(assistant\): no "
                                         r"end-of-turn token closes its trained tokens$"):
        trainer.audit_chat(cut, messages, tok, tpl, record=5, path="a.json")
    # A template that ends no turn with an end token: chat_example refuses it.
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"^a\.json: record 5 message 3 \(assistant\): no "
                                         r"end-of-turn token \(.*<\|eot_id\|>.*\) follows"):
        trainer.chat_example(messages, tok, plain, record=5, path="a.json")


@needs_data
def test_audit_refuses_untrained_or_extra_spans():
    tok, messages, tpl, example = _llama3_sample()
    none = trainer.Example(example.tokens, np.zeros_like(example.weights))
    with pytest.raises(ValueError, match=r"^a\.json: record 5: 1 assistant turns but 0 trained"):
        trainer.audit_chat(none, messages, tok, tpl, record=5, path="a.json")
    extra = example.weights.copy()
    extra[1] = 1
    with pytest.raises(ValueError, match=r"^a\.json: record 5: 2 trained spans but 1 assistant"):
        trainer.audit_chat(trainer.Example(example.tokens, extra), messages, tok, tpl,
                           record=5, path="a.json")


@needs_data
def test_audit_refuses_a_double_bos():
    tok, messages, tpl, _ = _llama3_sample()
    twice = "{{ bos_token }}" + tpl   # a template that writes BOS twice
    example, _ = trainer.chat_example(messages, tok, twice, record=5, path="a.json")
    assert example.tokens[:2].tolist() == [128000, 128000]
    with pytest.raises(ValueError, match=r"^a\.json: record 5: the example starts with two BOS"):
        trainer.audit_chat(example, messages, tok, twice, record=5, path="a.json")


@needs_data
def test_audit_refuses_missing_content():
    tok, messages, tpl, example = _llama3_sample()
    other = messages[:2] + [{"role": "assistant", "content": "The capital of Spain is Madrid."}]
    with pytest.raises(ValueError, match=r"^a\.json: record 5 message 3 \(assistant\): its "
                                         r"content is missing from its trained tokens$"):
        trainer.audit_chat(example, other, tok, tpl, record=5, path="a.json")
    # A template that drops the assistant's content: chat_example refuses it.
    drops = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
             "{% if m.role != 'assistant' %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
             "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
             "{% endif %}")
    with pytest.raises(ValueError, match=r"^a\.json: record 5 message 3 \(assistant\): the "
                                         r"chat template drops its content$"):
        trainer.chat_example(messages, tok, drops, record=5, path="a.json")


@needs_data
def test_audit_refuses_roles_out_of_order():
    tok, messages, tpl, example = _llama3_sample()
    swapped = [messages[0], messages[2], messages[1]]
    for call in (trainer.audit_chat, trainer.chat_example):
        args = (example,) if call is trainer.audit_chat else ()
        with pytest.raises(ValueError, match=r"^a\.json: record 5 message 2 is 'assistant' "
                                             r"where 'user' was expected"):
            call(*args, swapped, tok, tpl, record=5, path="a.json")


@needs_data
def test_audit_warns_of_a_dropped_system_message():
    tok, messages, tpl, _ = _llama3_sample()
    no_system = tpl.replace("{{- system_message }}", "")   # Llama-3.1 without its system text
    assert no_system != tpl
    example, info = trainer.chat_example(messages, tok, no_system, record=5, path="a.json")
    assert trainer.audit_chat(example, messages, tok, no_system, record=5, path="a.json") == [
        "the chat template drops the system message (its text is not in the rendered "
        "conversation)"] == info["warnings"]


@needs_data
def test_audit_warns_of_a_generation_prompt_that_is_not_a_prefix():
    tok, messages, tpl, _ = _llama3_sample()
    # A template whose generation prompt differs from how it writes an assistant turn.
    other = tpl.replace("{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
                        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n' }}")
    assert other != tpl
    example, info = trainer.chat_example(messages, tok, other, record=5, path="a.json")
    warnings = trainer.audit_chat(example, messages, tok, other, record=5, path="a.json")
    assert warnings == info["warnings"] and len(warnings) == 1
    assert warnings[0].startswith("the generation prompt (the conversation up to the user "
                                  "message before its last assistant message, rendered with "
                                  "add_generation_prompt) is not a prefix of the training text")


def test_mark_spans_without_data():
    class Chars:   # a stand-in tokenizer: one character per id
        sp = None

        class hf:
            @staticmethod
            def decode(ids, skip_special_tokens=False):
                return "".join(map(chr, ids))

    tokens = np.asarray([ord(c) for c in "Q: hi A: yo."], np.int32)
    weights = np.asarray([0] * 9 + [1, 1, 1], np.float32)
    assert trainer.mark_spans(trainer.Example(tokens, weights), Chars) == "Q: hi A: \u27e6yo.\u27e7"


@needs_data
def test_train_py_on_chat_records_end_to_end(tmp_path, capsys):
    """train.py on a chat file with a tiny model (stories260K's trained weights: random ones
    with frozen small embeddings cannot raise a token's probability far) whose folder carries
    the Qwen2.5 template and a small ChatML tokenizer: --check-data audits it and writes
    nothing, the loss falls, and --generate (the prompt as a user message) stops at
    <|im_end|>."""
    pytest.importorskip("jinja2")
    tokenizers = pytest.importorskip("tokenizers")
    import shutil
    from tokenizers import decoders, models, pre_tokenizers, trainers
    import train
    folder = str(tmp_path / "model")
    os.makedirs(folder)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(DATA, "stories260K", "hf", name), folder)
    shutil.copy(os.path.join(DATA, "chat_templates", "Qwen2.5-7B-Instruct.jinja"),
                os.path.join(folder, "chat_template.jinja"))
    words = "zero one two three four five six seven eight nine".split()
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Ids 0-3, then the 256 bytes, then merges. The two trained tokens land on ids whose tied
    # embeddings stories260K learned to predict: "ok", the answer, is a merge (its ids 3-258
    # are byte-fallback pieces it never saw), and <|im_end|> is id 1, its BOS, which it
    # predicts after each story (never its EOS, id 2).
    specials = ["<unk>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    trainer_ = trainers.BpeTrainer(vocab_size=340, special_tokens=specials,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["system user assistant You are Qwen, created by Alibaba Cloud. You are a helpful "
              "assistant. Spell " + " ".join(words), "ok"] * 20
    tok.train_from_iterator(corpus, trainer_)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": None}, f)
    rng = np.random.default_rng(0)
    records = []
    for _ in range(200):
        d = rng.integers(0, 10, 2)
        records.append({"messages": [{"role": "user", "content": f"Spell {d[0]} {d[1]}"},
                                     {"role": "assistant", "content": "ok"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = train.main(["--check-data", "--model", folder, "--data", str(data), "--show", "1"])
    out = capsys.readouterr().out
    assert summary["records"] == 200 and summary["refusals"] == 0 and summary["format"] == "chat"
    assert "\u27e6ok<|im_end|>\u27e7" in out and not os.path.exists(tmp_path / "out")
    run = str(tmp_path / "run")
    train.main(["--model", folder, "--data", str(data), "--out", run, "--steps", "40",
                "--lr", "1e-2", "--warmup", "2", "--targets", "all", "--dtype", "float32",
                "--lora-dropout", "0", "--log-every", "10", "--eval-split", "0",
                "--seq-len", "256"])
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.1 * losses[0], losses
    result = train.main(["--generate", "--model", folder, "--adapter",
                         os.path.join(run, "adapter"), "--prompt", "Spell 3 4",
                         "--max-new-tokens", "12", "--dtype", "float32"])
    out = result["outputs"][0]
    assert out[-1] == 1 and len(out) < 12, out   # <|im_end|> ended the reply
