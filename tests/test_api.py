"""The Python API: pybitnet.LLM / SamplingParams (generate, stream, chat) and its errors."""

from __future__ import annotations

import shutil

import pytest

import pybitnet
from pybitnet import LLM, SamplingParams
from pybitnet.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, TokenizerError
from test_engine_helpers import gguf_model, model_dir, tiny_llm

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return tiny_llm("tiny-llama")


def test_public_names():
    assert pybitnet.LLM is LLM and pybitnet.SamplingParams is SamplingParams
    assert callable(pybitnet.load_model)


def test_generate_text_and_token_prompts(llm):
    ids = llm.tokenizer.encode("Hello world")
    outs = llm.generate(["Hello world", ids], GREEDY)
    assert [o.prompt for o in outs] == ["Hello world", None]
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids == ids
    assert outs[0].token_ids == outs[1].token_ids and outs[0].text == outs[1].text
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    single = llm.generate("Hello world", GREEDY)
    assert len(single) == 1 and single[0].token_ids == outs[0].token_ids
    assert llm.generate(ids, GREEDY)[0].token_ids == outs[0].token_ids  # one prompt given as a list of ids
    t = outs[0].timings
    assert t.prompt_tokens == len(ids) and t.generated_tokens == 12
    assert t.prompt_eval_s > 0 and t.eval_s > 0 and t.tokens_per_s > 0 and t.total_s >= t.eval_s


def test_per_prompt_params_and_defaults(llm):
    outs = llm.generate(
        ["a", "b"],
        [SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)],
    )
    assert [len(o.token_ids) for o in outs] == [2, 5]
    assert (
        len(llm.generate("a", SamplingParams(ignore_eos=True))[0].token_ids) == 16
    )  # vLLM's default max_tokens
    with pytest.raises(InvalidRequestError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_stream_and_early_close_cancels(llm):
    full = llm.generate("Once", GREEDY)[0]
    stream = llm.stream("Once", GREEDY)
    assert "".join(stream) == full.text
    assert stream.output.finish_reason == "length"
    partial = llm.stream("Once", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    first = next(iter(partial))
    assert first
    partial.close()
    llm.engine.step()
    assert not llm.engine.has_unfinished()


def test_interleaved_streams_each_get_their_own_text(llm):
    alone = [llm.generate(p, GREEDY)[0].text for p in ("First prompt", "Second one")]
    a, b = llm.stream("First prompt", GREEDY), llm.stream("Second one", GREEDY)
    texts = ["", ""]
    iters = [iter(a), iter(b)]
    done = [False, False]
    while not all(done):
        for i, it in enumerate(iters):
            if not done[i]:
                try:
                    texts[i] += next(it)
                except StopIteration:
                    done[i] = True
    assert texts == alone


def test_chat(llm):
    reply = llm.chat(CHAT, GREEDY)
    assert len(reply) == 1
    prompt_ids = llm.tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert reply[0].prompt_token_ids == prompt_ids
    assert reply[0].token_ids == llm.generate(prompt_ids, GREEDY)[0].token_ids
    both = llm.chat([CHAT, CHAT[1:]], GREEDY)
    assert len(both) == 2 and both[0].token_ids == reply[0].token_ids
    assert "".join(llm.stream_chat(CHAT, GREEDY)) == reply[0].text


@pytest.mark.parametrize(
    ("make_params", "error", "match"),
    [
        (lambda: SamplingParams(temperature=-1), InvalidRequestError, "temperature"),
        (lambda: SamplingParams(top_p=0), InvalidRequestError, "top_p"),
        (lambda: SamplingParams(top_p=1.01), InvalidRequestError, "top_p"),
    ],
)
def test_bad_sampling_params(make_params, error, match):
    with pytest.raises(error, match=match):
        make_params()


def test_bad_prompts(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(InvalidRequestError, match="no prompts"):
        llm.generate([], GREEDY)
    with pytest.raises(ContextLengthError, match="context"):
        llm.generate("word " * 600, GREEDY)
    short = LLM(model_dir(), device="cpu", kernel="reference", max_model_len=16)
    with pytest.raises(ContextLengthError, match="holds 16"):
        short.generate("a much longer prompt than sixteen tokens can hold, surely, many words", GREEDY)
    with pytest.raises(ContextLengthError):
        short.chat(CHAT * 4, GREEDY)
    assert not short.engine.has_unfinished()


def test_bad_models_and_options(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="neither an existing path nor a hub id"):
        LLM(str(tmp_path / "missing"))
    monkeypatch.setattr("pybitnet.engine.default_model.default_model", lambda: None)
    with pytest.raises(ModelNotFoundError, match="no model given"):
        LLM(None)
    with pytest.raises(InvalidRequestError, match="unknown device"):
        LLM(model_dir(), device="tpu7")
    with pytest.raises(InvalidRequestError, match="threads"):
        LLM(model_dir(), threads=0)
    with pytest.raises(InvalidRequestError, match="dtype"):
        LLM(model_dir(), dtype="int3")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir(), no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        LLM(no_tok, device="cpu", kernel="reference")


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        LLM("nobody-here/no-such-model-xyz")


def test_gguf_model_uses_the_tokenizer_it_carries():
    hf_dir, gguf = gguf_model()
    from_dir = LLM(hf_dir, device="cpu", kernel="reference")
    from_gguf = LLM(gguf, device="cpu", kernel="reference")
    for text in ("Hello world! héllo 日本 🙂", "a <|eot_id|> b\n\tc"):
        assert from_gguf.tokenizer.encode(text) == from_dir.tokenizer.encode(text)
    assert from_gguf.chat_prompt(CHAT) == from_dir.chat_prompt(CHAT)
    assert from_gguf.tokenizer.stop_token_ids == from_dir.tokenizer.stop_token_ids
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert from_gguf.generate("The sky is", p)[0].token_ids == from_dir.generate("The sky is", p)[0].token_ids


def test_interrupted_calls_leave_no_requests_behind(llm, monkeypatch):
    never_read = llm.stream("Never read", GREEDY)
    never_read.close()
    real_step, calls = llm.engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["one", "two"], SamplingParams(max_tokens=50, ignore_eos=True))
    monkeypatch.undo()
    llm.engine.step()
    assert not llm.engine.has_unfinished() and not llm._mailboxes


def test_token_healing_backs_over_the_prompts_last_token():
    """The embedded model's tokenizer merges "):" with the newline after it, so a prompt ending in "):" ends
    mid-token: healing drops that token and lets the first new one be any token that starts with its text."""
    llm = LLM()
    prompt = "def fibonacci(n):"
    ids = llm.tokenizer.encode(prompt)
    healed, tail, allowed = llm.tokenizer.heal(ids)
    assert healed == ids[:-1] and tail == "):" and ids[-1] in allowed and len(allowed) >= 2
    assert all(llm.tokenizer.token_text(i).startswith(tail) for i in allowed)
    assert llm.tokenizer.heal(ids[:1]) == (ids[:1], "", [])  # a lone BOS: nothing to heal

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, token_healing=True)
    out = llm.generate(prompt, params)[0]
    assert out.prompt_token_ids == healed and out.token_ids[0] in allowed
    assert prompt + out.text == llm.tokenizer.decode(healed + out.token_ids)  # the text continues the prompt
    assert "".join(llm.stream(prompt, params)) == out.text
    plain = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert plain.token_ids[0] not in allowed  # this model, unhealed, leaves the code it was trained on
    with pytest.raises(InvalidRequestError, match="token_healing"):
        SamplingParams(token_healing="yes")


@pytest.fixture
def restore_threads():
    import torch

    from pybitnet.kernels import cpu

    before = torch.get_num_threads(), cpu.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    cpu.set_num_threads(before[1])


def test_threads_go_to_the_c_kernels_and_torch_keeps_one_beside_them(restore_threads):
    """With the C kernels running the model, `threads` sizes their pool and torch drops to one intra-op thread
    (its spinning threads would take the cores from the kernels); on the reference kernel they are torch's."""
    import torch

    from pybitnet.kernels import cpu

    LLM(model_dir(), device="cpu", kernel="cpu", threads=3)
    assert (cpu.get_num_threads(), torch.get_num_threads()) == (3, 1)
    LLM(model_dir(), device="cpu", kernel="reference", threads=2)
    assert torch.get_num_threads() == 2
