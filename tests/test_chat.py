"""``llmq chat`` on the bundled SmolLM2 quantized to int4: a real terminal (pexpect) for the
interactive commands, Ctrl-C and the context limit; one-shot mode; greedy replies equal to
``model.generate``'s tokens. Also history fitting, the plain-text fallback and stop strings,
which need the tokenizer only."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from llmq import QuantConfig, QuantLinear
from llmq.assets import resolve_model
from llmq.chat import (
    NO_TEMPLATE_NOTICE,
    PLAIN_STOPS,
    ChatSession,
    Conversation,
    PromptTooLongError,
    Sampling,
    _StopFlag,
    _Streamer,
    load_chat_model,
    render_prompt,
)
from llmq.pipeline import quantize

QUESTION = "What is the capital of France?"
NEW_TOKENS = 8  # small: the reference kernel dequantizes every layer at each decode step
TIMEOUT = 240
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # readline's bracketed-paste switches


def _env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb"}


def _chat_cmd(model: Path, *extra: str) -> list[str]:
    # One thread: on a busy 2-core machine two OpenMP threads waiting on each other are several times slower.
    return [sys.executable, "-m", "llmq.cli", "chat", "--model", str(model), "--greedy",
            "--max-new-tokens", str(NEW_TOKENS), "--threads", "1", *extra]


def _clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r\n", "\n")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """As ``_chat_cmd``'s ``--threads 1``, for the quantizing and generating done in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def int4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "smollm2-int4"
    quantize("smollm2-135m", QuantConfig(bits=4, group_size=128), out, progress=False)
    return out


@pytest.fixture(scope="module")
def loaded(int4):
    return load_chat_model(str(int4))


@pytest.fixture(scope="module")
def expected(loaded) -> tuple[list[int], str]:
    """``model.generate``'s greedy tokens and text for QUESTION, with transformers' own template call."""
    model, tok = loaded
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True).strip()


class _Chunks:
    """A text stream that keeps each write, to see the reply arrive in pieces."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.slow
def test_greedy_reply_streams_and_matches_model_generate(loaded, expected):
    model, tok = loaded
    out = _Chunks()
    session = ChatSession(model, tok, Sampling(temperature=0, max_new_tokens=NEW_TOKENS), out=out)
    reply = session.ask(QUESTION)
    want_ids, want_text = expected
    assert reply.token_ids == want_ids and len(want_ids) > 0
    assert reply.text == want_text != ""
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) >= 2, f"reply was not streamed: {out.writes}"
    assert "".join(out.writes).strip() == reply.text
    s = reply.stats
    assert s.new_tokens == len(want_ids) and s.prompt_tokens > 10 and not s.interrupted
    assert s.prefill_seconds > 0 and s.decode_seconds > 0 and s.decode_tokens_per_second > 0
    assert session.conversation.turns == 1


@pytest.mark.slow
def test_interactive_session(int4, expected):
    """A streamed answer, Ctrl-C cutting a reply short, /stats, /reset, /exit — in a real terminal."""
    child = pexpect.spawn(_chat_cmd(int4)[0], _chat_cmd(int4)[1:], env=_env(), encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(50, 400))
    try:
        child.expect_exact("you> ")
        child.sendline(QUESTION)
        child.expect_exact("you> ")
        answer = _clean(child.before).split(QUESTION, 1)[1].strip()
        assert answer == expected[1] != ""

        child.sendline("Tell me a long story about a dragon who learns to read.")
        child.expect(r"read\.[^\n]*\n\s*[A-Za-z0-9]")  # the echoed line, then the first piece of the reply
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact("you> ")

        child.sendline("/stats")
        child.expect(r"history: 2 turns.*\n.*last reply: prompt \d+ tokens.*decode (\d+) tokens.*interrupted")
        assert 1 <= int(child.match.group(1)) < NEW_TOKENS
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("history cleared")
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"history: 0 turns")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_over_long_prompt_is_refused_and_eof_exits(int4):
    child = pexpect.spawn(_chat_cmd(int4)[0], _chat_cmd(int4, "--max-context", "64")[1:], env=_env(),
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 400))
    try:
        child.expect_exact("you> ")
        child.sendline(" ".join(["word"] * 80))
        child.expect(r"prompt too long: (\d+) tokens.* only (\d+) fit")
        assert int(child.match.group(1)) > int(child.match.group(2)) == 64 - NEW_TOKENS
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"history: 0 turns")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_one_shot_prints_reply_and_exits_0(int4, expected):
    """``--prompt -`` reads stdin; stdout holds the reply only."""
    res = subprocess.run(_chat_cmd(int4, "--prompt", "-"), input=QUESTION, capture_output=True, text=True,
                         env=_env(), timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected[1]


def test_errors_are_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "llmq.cli", "chat", "--model", str(tmp_path / "missing"),
                          "--prompt", "hi"], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    missing = tmp_path / "missing"
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"llmq chat: error: unknown model '{missing}': no such folder"]
    res = subprocess.run([sys.executable, "scripts/chat.py", "--max-new-tokens", "0"], capture_output=True,
                         text=True, env=_env(), timeout=TIMEOUT, cwd=Path(__file__).parents[1])
    assert res.returncode == 2 and res.stderr.strip() == "llmq chat: error: --max-new-tokens must be >= 1, got 0"


def test_oldest_turns_are_dropped_to_fit(tokenizer):
    conv = Conversation(tokenizer, budget=10_000, system="Be brief.")
    for i in range(6):
        conv.add(f"question {i} " + "filler " * 20, f"answer {i} " + "filler " * 20)
    full, dropped = conv.prepare("last question")
    assert dropped == 0 and conv.turns == 6
    conv.budget = len(full) - 30  # forces out about two turns
    ids, dropped = conv.prepare("last question")
    assert len(ids) <= conv.budget
    assert 1 <= dropped < 6 and conv.turns == 6 - dropped
    assert conv.messages[0]["content"].startswith(f"question {dropped} ")
    text = tokenizer.decode(ids)
    assert "Be brief." in text and "last question" in text and "question 0 " not in text


def test_prompt_too_long_alone_leaves_history(tokenizer):
    conv = Conversation(tokenizer, budget=40)
    conv.add("hi", "hello")
    with pytest.raises(PromptTooLongError, match=r"prompt too long: \d+ tokens.*only 40 fit"):
        conv.prepare("word " * 60)
    assert conv.turns == 1


def test_plain_transcript_when_no_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    conv = Conversation(plain, budget=1000, system="Be brief.")
    conv.add("Hi", "Hello!")
    ids, _ = conv.prepare("Who are you?")
    assert plain.decode(ids, skip_special_tokens=True) == \
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\nAssistant:"
    assert conv.stop_strings == PLAIN_STOPS and Conversation(tokenizer, 1000).stop_strings == ()
    assert render_prompt(tokenizer, [{"role": "user", "content": "Hi"}]) != \
        render_prompt(plain, [{"role": "user", "content": "Hi"}])


def test_streamer_holds_back_and_cuts_stop_string(tokenizer):
    """The plain transcript's stop strings never reach the terminal, and end generation on the
    token that completes one."""
    out = _Chunks()
    streamer = _Streamer(tokenizer, out, PLAIN_STOPS)
    prompt = [1, 2, 3]
    flag = _StopFlag(tokenizer, PLAIN_STOPS, len(prompt))
    streamer.put(torch.tensor([prompt]))  # the prompt: not shown
    ids, seen = list(prompt), []
    for t in tokenizer(" Paris is nice.\nUser: and Rome?")["input_ids"]:
        ids.append(t)
        stop = flag(torch.tensor([ids]), None)  # generate asks the criteria before the streamer
        streamer.put(torch.tensor([t]))
        seen.append("".join(out.writes))
        if stop.item():
            break
    streamer.end()
    assert flag.stop_string_seen and not flag.interrupted
    assert tokenizer.decode(ids[len(prompt):]).endswith("\nUser:")
    assert "".join(out.writes) == streamer.shown == " Paris is nice."
    assert all("\n" not in s for s in seen)
    assert len(streamer.times) >= 2


class _Scripted(transformers.LlamaForCausalLM):
    """A causal LM rigged to continue with ``succ[previous token]``, whatever it was trained on."""

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = torch.full_like(out.logits, -1e4)
        out.logits[0, -1, self.succ[input_ids[0, -1]]] = 0
        return out


@pytest.mark.parametrize("next_turn", ["User", "Assistant"])
def test_base_model_reply_ends_at_the_next_turn(tokenizer, next_turn):
    """A base model (no chat template) that goes on writing the transcript, the user's next line or
    another "Assistant:" one, stops there; that line is cut from the reply and never shown, and a
    note says once that the tokenizer has no chat template."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    model = _Scripted(config).eval()
    # The prompt ends with "Assistant:"; after its ":" comes " Paris.\n{next_turn}:", and after that ":" the
    # same again, until the token limit unless generation stops.
    colon = plain("Assistant:")["input_ids"][-1]
    script = plain(f" Paris.\n{next_turn}:")["input_ids"]
    assert script[-1] == colon
    model.succ = torch.full((len(tokenizer),), config.eos_token_id)
    for prev, t in zip([colon, *script[:-1]], script, strict=True):
        model.succ[prev] = t
    out, notices = _Chunks(), _Chunks()
    session = ChatSession(model, plain, Sampling(temperature=0, max_new_tokens=40), out=out, notices=notices)
    replies = [session.ask("What is the capital of France?"), session.ask("And of Italy?")]
    assert [r.text for r in replies] == ["Paris.", "Paris."]
    assert [r.stats.new_tokens for r in replies] == [len(script)] * 2, script  # stopped at once
    assert "".join(out.writes) == " Paris.\n Paris.\n"
    assert "".join(notices.writes) == NO_TEMPLATE_NOTICE + "\n"
    assert session.conversation.messages[1] == {"role": "assistant", "content": "Paris."}


PROMPTS = ("The history of the Roman Empire", "def fibonacci(n):\n    ", "Water boils at")


@pytest.mark.slow
def test_cpu_fast_path_greedy_equals_torch_reference(loaded, tokenizer, monkeypatch):
    """The compiled CPU kernels and the torch reference give the same greedy tokens on fixed prompts."""
    from llmq.kernels import backend_for, cpu_build
    from llmq.kernels.cpu import cpu_available

    if cpu_build.cpu_supported() is not None:
        pytest.skip(f"no compiled CPU kernels here: {cpu_build.cpu_supported()}")
    assert cpu_available(), "this CPU supports the compiled kernels but they did not build (see the warning)"
    model, _ = loaded
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    runs = {}
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("LLMQ_KERNEL", backend)
        assert backend_for(torch.zeros(1)) == backend
        runs[backend] = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
            runs[backend].append(out[0, ids.shape[1]:].tolist())
    assert all(len(r) == 16 for r in runs["cpu"])
    assert runs["cpu"] == runs["torch"]
