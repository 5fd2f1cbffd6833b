"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import json
import shutil

import pytest

from pybitnet.engine import Tokenizer
from pybitnet.errors import InvalidRequestError, TokenizerError
from test_engine_helpers import model_dir

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's template, as published in its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Exercises what transformers' environment adds: trim/lstrip blocks, loop controls, namespace, tojson without
# HTML escaping, raise_exception, the generation tag, tools and extra variables.
FEATURE_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
    {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
    <{{ m['role'] }}>
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
    {%- else %}{{ m['content'] }}{% endif %}

{%- endfor %}
{%- if tools %}TOOLS {{ tools | tojson }}{% endif %}
{%- if ns.system %}SYSTEM {{ ns.system | tojson(indent=2) }}{% endif %}
{{ eos_token if not add_generation_prompt else '<assistant>' }}{{ extra_note | default('') }}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  You are terse. "}, {"role": "user", "content": "What is 2+2?\n"}],
    [
        {"role": "system", "content": 'Be kind <b>&</b> "precise"'},
        {"role": "user", "content": "héllo 日本 🙂"},
        {"role": "assistant", "content": "Hello! <|eot_id|>"},
        {"role": "user", "content": "Tell me more.\n\nPlease."},
    ],
]


def _with_template(tmp_path, template: str | list | None, jinja_file: str | None = None):
    d = tmp_path / "m"
    shutil.copytree(model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if template is None:
        cfg.pop("chat_template", None)
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja_file is not None:
        (d / "chat_template.jinja").write_text(jinja_file)
    return d


def _compare(d, conversation, add_generation_prompt, **kwargs):
    ours = Tokenizer.from_dir(d)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    text = ours.apply_chat_template(conversation, add_generation_prompt, **kwargs)
    ref = theirs.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    assert text == ref
    ids = ours.apply_chat_template(conversation, add_generation_prompt, tokenize=True, **kwargs)
    ref_ids = theirs.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **kwargs
    )
    assert ids == list(ref_ids)
    return text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_2b4t_template_matches_transformers(conversation, add_generation_prompt):
    text = _compare(model_dir(), conversation, add_generation_prompt)
    assert text.startswith("<|begin_of_text|>")
    assert text.endswith("Assistant: ") == add_generation_prompt


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_template_matches_transformers(tmp_path, conversation, add_generation_prompt):
    text = _compare(_with_template(tmp_path, LLAMA3_TEMPLATE), conversation, add_generation_prompt)
    assert text.count("<|eot_id|>") >= len(conversation)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_jinja_features_match_transformers(tmp_path, conversation):
    d = _with_template(tmp_path, FEATURE_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "f", "description": "<x> & y", "parameters": {}}}]
    _compare(d, conversation, True, tools=tools, extra_note="é")
    _compare(d, conversation, False)


def test_template_file_and_named_templates(tmp_path):
    d = _with_template(tmp_path, [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                                  {"name": "tool_use", "template": "T"}])  # fmt: skip
    assert Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0]) == "DHi"
    (d / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    _compare(d, CONVERSATIONS[0], True)
    assert Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0]) == "JHi"


def test_template_errors_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(_with_template(tmp_path, None)).apply_chat_template(CONVERSATIONS[0])
    tok = Tokenizer.from_dir(model_dir())
    with pytest.raises(TokenizerError, match="not valid jinja"):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=FEATURE_TEMPLATE)
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError, match="message 0"):
        tok.apply_chat_template([{"content": "no role"}])


def test_sandbox_blocks_unsafe_access():
    tok = Tokenizer.from_dir(model_dir())
    with pytest.raises(TokenizerError):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{{ messages.__class__.__mro__ }}")
