"""Chat templates (`runtime.chat`, `infq run --chat`) against transformers' `apply_chat_template`,
and the GGUF SPM tokenizer's special-token splitting against llama.cpp's rules."""

from __future__ import annotations

import json

import pytest
import torch
from clitools import error_line, invoke, last_json

from infq.cli.app import app
from infq.errors import InfqError
from infq.runtime.chat import ChatEncoder, read_template, render

CHATML = (  # Qwen2.5's shape: a default system turn when the conversation has none
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA2 = (  # raise_exception, bos/eos variables, loop.index0, strip
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (  # whitespace control through trim_blocks / lstrip_blocks, loop.first, tojson, namespace
    "{% set ns = namespace(n=0) %}\n"
    "{% for message in messages %}\n"
    "    {% set ns.n = ns.n + 1 %}\n"
    "    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}\n"
    "    {% if loop.first %}{% set content = bos_token + content %}{% endif %}\n"
    "    {{ content }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"
    "{{ '' if ns.n < 2 else ({'n': ns.n, 'note': 'ü'} | tojson) }}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c ü"}],
]


def _with_specials(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


@pytest.mark.parametrize("template", [CHATML, LLAMA2, LLAMA3], ids=["chatml", "llama2", "llama3"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_render_equals_transformers(tiny_tokenizer, template, conv):
    """Oracle: transformers' own renderer, text and ids, with and without the generation prompt."""
    tok = _with_specials(tiny_tokenizer)
    messages = CONVERSATIONS[conv]
    enc = ChatEncoder(tok, template)
    for gen in (True, False):
        want = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert render(template, messages, enc.specials, add_generation_prompt=gen) == want
    ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert enc(messages) == list(ids)


def test_prompt_becomes_user_turn_after_system(tiny_tokenizer):
    tok = _with_specials(tiny_tokenizer)
    enc = ChatEncoder(tok, CHATML, system="Be brief.")
    assert enc.text("Hello") == render(CHATML, [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hello"}], enc.specials)
    assert enc.text("Hello").count("<|im_start|>system") == 1  # the template's default system turn is replaced
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert enc("Hello")[0] == im_start  # one token, no BOS added by the tokenizer (the template decides)


def test_template_errors_are_one_line(tiny_tokenizer):
    with pytest.raises(InfqError, match="roles must alternate"):
        render(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {"bos_token": "<s>"})
    with pytest.raises(InfqError, match="syntax error on line 1"):
        render("{% for m in messages %}", CONVERSATIONS[0])
    with pytest.raises(InfqError, match="has no chat template"):
        ChatEncoder(tiny_tokenizer)


def test_read_template(tmp_path):
    (tmp_path / "t.jinja").write_text(CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": CHATML},
                                                                                  {"name": "tool_use", "template": "x"}]}))
    (tmp_path / "bad.json").write_text("{}")
    assert read_template(tmp_path / "t.jinja") == CHATML
    assert read_template(tmp_path / "tokenizer_config.json") == CHATML
    with pytest.raises(InfqError, match="'chat_template' field"):
        read_template(tmp_path / "bad.json")
    with pytest.raises(InfqError, match="no such file"):
        read_template(tmp_path / "missing.jinja")


@pytest.fixture
def chat_model(tiny_model):
    """The tiny model with ChatML specials, a chat template and generation_config naming <|im_end|>."""
    from transformers import AutoTokenizer

    tok = _with_specials(AutoTokenizer.from_pretrained(tiny_model))
    tok.chat_template = CHATML
    tok.save_pretrained(tiny_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    (tiny_model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, im_end]}))
    return tiny_model, tok, im_end


def test_run_chat_equals_transformers_generate(chat_model, tmp_path):
    """`infq run --chat --system` = transformers' greedy generate on apply_chat_template's ids."""
    import transformers

    path, tok, _ = chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None,
                       pad_token_id=0)[0, len(ids):].tolist()
    r = last_json(invoke("run", path, "--chat", "--system", "Be brief.", "-p", "Hello", "--max-new-tokens", 6,
                         "--ignore-eos", "--json"))
    assert r["prompt_tokens"] == len(ids) and r["token_ids"] == want
    # a .jsonl conversation is the same request (chat implied by 'messages')
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n")
    out = invoke("run", path, "--prompts-file", f, "--max-new-tokens", 6, "--ignore-eos", "--json")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert rows[0]["token_ids"] == want and rows[0]["prompt_tokens"] == len(ids)
    # the plain prompt got the template's default system turn instead
    plain = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True, add_generation_prompt=True)
    assert rows[1]["prompt_tokens"] == len(plain if isinstance(plain, list) else plain["input_ids"])


def test_generation_config_eos_ends_a_turn(chat_model):
    from infq.runtime.generate import eos_ids
    from infq.runtime.loader import load_model

    path, _, im_end = chat_model
    assert eos_ids(load_model(str(path))) == sorted({2, im_end})


def test_run_chat_errors(tiny_model, tmp_path):
    assert "has no chat template" in error_line(invoke("run", tiny_model, "--chat", "-p", "x"))
    assert "no such file" in error_line(invoke("run", tiny_model, "--chat-template", tmp_path / "none.jinja", "-p", "x"))
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    assert "'role' string" in error_line(invoke("run", tiny_model, "--prompts-file", f))
    (tmp_path / "t.jinja").write_text(LLAMA2)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n")
    assert "roles must alternate" in error_line(invoke("run", tiny_model, "--prompts-file", f, "--chat-template",
                                                       tmp_path / "t.jinja"))


# ------------------------------------------------------------------ GGUF SPM: special tokens in text

def _spm(types: dict[str, int]):
    """A byte-fallback SPM vocab: <unk> <s> </s>, 256 byte tokens, a few pieces, and `types` appended."""
    from infq.formats.gguf_tokenizer import SpmTokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "\u2581a", "b"]
    kinds = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    for text, kind in types.items():
        tokens.append(text)
        kinds.append(kind)
    return SpmTokenizer(tokens, [0.0] * len(tokens), kinds, bos=1, eos=2, unk=0)


def test_spm_splits_special_tokens_like_llamacpp():
    """llama.cpp's rules (tokenizer_st_partition + the SPM session): user-defined tokens always,
    control tokens only with parse_special, longest first, a space prefix after every special."""
    tok = _spm({"<|im_start|>": 3, "<tool>": 4, "<tool></tool>": 4})
    im, tool, pair = (tok.ids[t.encode()] for t in ("<|im_start|>", "<tool>", "<tool></tool>"))
    sp_a, b = tok.ids["\u2581a".encode()], tok.ids[b"b"]
    assert tok.partition("a<tool></tool>b<tool>", parse_special=False) == ["a", pair, "b", tool]
    assert tok.partition("<|im_start|>a", parse_special=False) == ["<|im_start|>a"]
    assert tok.partition("<|im_start|>a", parse_special=True) == [im, "a"]
    # "a" after a special token gets the space prefix again (▁a), as the first piece does
    assert tok.encode("<|im_start|>a<tool>a", add_special_tokens=False, parse_special=True) == [im, sp_a, tool, sp_a]
    assert tok.encode("ab", add_special_tokens=True) == [1, sp_a, b]
    assert tok.encode("", add_special_tokens=True) == [1]


def test_gguf_carries_the_template_and_runs_the_same_chat(tmp_path):
    """A model directory with a chat template, and the GGUF infq converts it to (tokenizer.chat_template,
    SPM vocab): `infq run --chat` gives the same prompt ids (transformers' apply_chat_template) and
    the same greedy tokens from both."""
    import shutil

    from transformers import AutoTokenizer

    from infq.formats.gguf_convert import convert_to_gguf
    from infq.formats.hf import demo_model_path

    src = tmp_path / "demo-chat"
    shutil.copytree(demo_model_path(), src)
    (src / "chat_template.jinja").write_text(LLAMA2)
    convert_to_gguf(str(src), str(tmp_path / "demo-chat.gguf"), "F16", force=False)  # F16: the demo's own weights
    tok = AutoTokenizer.from_pretrained(src)
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "def add(a, b):"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, none added
    rows = {}
    for name in ("demo-chat", "demo-chat.gguf"):
        rows[name] = last_json(invoke("run", tmp_path / name, "--system", "Answer in Python.", "-p", "def add(a, b):",
                                      "--max-new-tokens", 8, "--ignore-eos", "--dtype", "float32", "--json"))
        assert rows[name]["prompt_tokens"] == len(ids), name
    assert rows["demo-chat"]["token_ids"] == rows["demo-chat.gguf"]["token_ids"]
    info = last_json(invoke("inspect", tmp_path / "demo-chat.gguf", "--summary", "--json"))
    assert info["tokenizer"]["chat_template"] == "tokenizer.chat_template" and info["tokenizer"]["eos_token_ids"] == [2]


def test_interactive_conversation_keeps_turns_and_reuses_the_cache(chat_model):
    """`infq run -i`: each line is a user turn of one conversation; turn 2's prompt is the whole
    conversation (its ids = apply_chat_template over turn 1, the reply, turn 2), mostly served from
    the prefix cache; /reset starts again; end of input quits."""
    from clitools import runner

    path, tok, _ = chat_model
    r = runner.invoke(app, ["run", str(path), "-i", "--system", "Be brief.", "--max-new-tokens", "5",
                                      "--ignore-eos", "--json"], input="Hello\nand then\\\nmore\n/reset\nHello\n")
    assert r.exit_code == 0, r.output
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [t["prompt"] for t in turns] == ["Hello", "and then\nmore", "Hello"]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": turns[0]["text"]}, {"role": "user", "content": "and then\nmore"}]
    ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    assert turns[1]["prompt_tokens"] == len(ids if isinstance(ids, list) else ids["input_ids"])
    assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"] - 16  # turn 1's full blocks, at least
    assert turns[2]["token_ids"] == turns[0]["token_ids"]  # after /reset: the first turn again (greedy)
    assert turns[2]["cached_tokens"] > 0


def test_interactive_refuses_prompts(tiny_model):
    assert "--interactive reads its turns" in error_line(invoke("run", tiny_model, "-i", "-p", "x"))


def test_chat_with_speculative_draft_matches_plain(chat_model):
    """--chat with --draft ngram: the plain baseline re-encodes the prompts through the same template."""
    path, tok, _ = chat_model
    r = last_json(invoke("run", path, "--chat", "-p", "Hello Hello Hello", "--draft", "ngram", "--max-new-tokens", 8,
                         "--ignore-eos", "--json"))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello Hello Hello"}], tokenize=True,
                                  add_generation_prompt=True)
    assert r["prompt_tokens"] == len(ids if isinstance(ids, list) else ids["input_ids"])
    assert r["matches_plain"] is True


def test_quantized_output_keeps_the_chat_template(chat_model, tmp_path):
    """`infq inspect` reports the template and end ids; a quantized checkpoint keeps both and chats
    with the same prompt ids."""
    path, tok, im_end = chat_model
    info = last_json(invoke("inspect", path, "--summary", "--json"))
    assert info["tokenizer"]["chat_template"] in ("chat_template.jinja", "tokenizer_config.json")
    assert info["tokenizer"]["eos_token_ids"] == sorted({2, im_end})
    q = tmp_path / "q"
    r = invoke("quantize", "--model", path, "--method", "rtn", "--bits", 4, "--group-size", 32, "--out", q)
    assert r.exit_code == 0, r.output
    qi = last_json(invoke("inspect", q, "--summary", "--json"))
    assert qi["tokenizer"]["chat_template"] == info["tokenizer"]["chat_template"]
    assert qi["tokenizer"]["eos_token_ids"] == info["tokenizer"]["eos_token_ids"]
    run = last_json(invoke("run", q, "--chat", "-p", "Hello", "--max-new-tokens", 2, "--json"))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True, add_generation_prompt=True)
    assert run["prompt_tokens"] == len(ids if isinstance(ids, list) else ids["input_ids"])
