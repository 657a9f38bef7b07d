"""``llmq chat``: talk to a quantized (or unquantized) causal LM in the terminal.

Replies stream as they are generated. The conversation is rendered with the tokenizer's chat
template (a plain ``User:``/``Assistant:`` transcript when it has none) and kept inside the
context window by dropping the oldest turns. Ctrl-C stops the current reply, not the chat.

transformers is imported inside functions only, so that ``llmq --help`` stays fast.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

PROMPT = "you> "
COMMANDS_HELP = ("/reset  clear the history    /system TEXT  set the system prompt (no TEXT: clear it)\n"
                 "/stats  history size and speed of the last reply    /exit  quit (also Ctrl-D)\n"
                 "Ctrl-C stops the reply being generated.")
# Transcript used when the tokenizer has no chat template. A base model continues it past its
# own turn, writing the user's next line or another "Assistant:" one: the reply ends (and is cut)
# where any role's line starts, matched in the decoded text whatever the tokens.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOPS = tuple(f"\n{label}:" for label in PLAIN_ROLES.values())
NO_TEMPLATE_NOTICE = ("[the tokenizer has no chat template: using a plain User:/Assistant: transcript; "
                      "each reply ends where the model starts a new turn]")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

Message = dict[str, str]


class PromptTooLongError(ValueError):
    """The new message (with the system prompt) alone does not fit the context window."""


@dataclass
class Sampling:
    """Decoding settings of every reply; ``temperature == 0`` means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self, base: GenerationConfig, min_new_tokens: int = 0) -> GenerationConfig:
        """A copy of the model's ``base`` config with these settings (its own sampling defaults,
        such as a checkpoint's temperature, are overridden so that ``--greedy`` is greedy)."""
        config = copy.deepcopy(base)
        if self.greedy:
            # None rather than values: transformers warns about sampling knobs set while greedy.
            config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            config.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k or None)
        config.update(max_new_tokens=self.max_new_tokens, min_new_tokens=min_new_tokens or None)
        if config.pad_token_id is None and config.eos_token_id is not None:
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        return config


@dataclass
class ReplyStats:
    """Timing of one reply. The prefill also produces the first new token, so decode speed
    counts the tokens after it."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    interrupted: bool = False

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.nan

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else math.nan


@dataclass
class Reply:
    """A generated reply: its text (cut at a stop string), the token ids generate produced
    (EOS included when it ended on one) and its timing."""

    text: str
    token_ids: list[int]
    stats: ReplyStats


class _StopFlag:
    """Stopping criterion that ends generation once Ctrl-C was pressed, or once the reply (the
    tokens after the first ``prompt_tokens``) decodes to text holding one of ``stop_strings``: on
    the step whose token completes it (``generate`` calls the streamer only after this)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, stop_strings: Sequence[str] = (),
                 prompt_tokens: int = 0) -> None:
        self.tokenizer, self.stop_strings, self.prompt_tokens = tokenizer, tuple(stop_strings), prompt_tokens
        self.interrupted = False
        self.stop_string_seen = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.stop_strings and not self.stop_string_seen:
            text = self.tokenizer.decode(input_ids[0, self.prompt_tokens:], skip_special_tokens=True)
            self.stop_string_seen = _cut_at_stop(text, self.stop_strings)[1]
        stop = self.interrupted or self.stop_string_seen
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stop_strings`` in it, and whether it held one."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class _Streamer:
    """``generate`` streamer: decodes the reply as tokens arrive, writes the new text to ``out``
    and records when each ``put`` came (the first one is the prompt, just before the prefill).

    The reply is cut at the first stop string, and text that could be the start of one is held
    back until it is known not to be one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO | None, stop_strings: Sequence[str]) -> None:
        self.tokenizer, self.out, self.stop_strings = tokenizer, out, tuple(stop_strings)
        self.times: list[float] = []
        self.ids: list[int] = []
        self.shown = ""

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.ids.extend(value.reshape(-1).tolist())
            self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text, stopped = _cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop_strings)
        final = final or stopped
        if not final:
            text = text.rstrip("\ufffd")  # a multi-byte character split across tokens
            text = text[:len(text) - _held_back(text, self.stop_strings)]
        # Decoding a longer sequence can rewrite the end of a shorter one's text (rare, tokenizer
        # dependent); such text is written once it is stable again.
        if text.startswith(self.shown) and len(text) > len(self.shown):
            if self.out is not None:
                self.out.write(text[len(self.shown):])
                self.out.flush()
            self.shown = text
        elif final:
            self.shown = text

    def stats(self, prompt_tokens: int, interrupted: bool) -> ReplyStats:
        if len(self.times) < 2:  # stopped before the first token
            return ReplyStats(prompt_tokens, 0, interrupted=interrupted)
        start, first, last = self.times[0], self.times[1], self.times[-1]
        return ReplyStats(prompt_tokens, len(self.ids), first - start, last - first, interrupted)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``stops``."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@contextlib.contextmanager
def _ctrl_c_sets(flag: _StopFlag) -> Iterator[None]:
    """While generating, a first Ctrl-C sets ``flag`` (the reply ends after the current token);
    a second one raises ``KeyboardInterrupt`` for when a step takes too long to wait for."""

    def handler(signum: int, frame: Any) -> None:
        if flag.interrupted:
            raise KeyboardInterrupt
        flag.interrupted = True

    if threading.current_thread() is not threading.main_thread():  # signal handlers are main-thread only
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a reply: the generation config's and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int],
                   sampling: Sampling, out: TextIO | None = None, stop_strings: Sequence[str] = (),
                   min_new_tokens: int = 0) -> Reply:
    """Generate a reply to the prompt ``input_ids`` (batch of one), streaming its text to ``out``.

    Ctrl-C (in the main thread) stops it early; the reply then holds what was generated so far.
    ``min_new_tokens`` forces that many tokens (EOS suppressed), for benchmarks.
    """
    from transformers import StoppingCriteriaList

    flag = _StopFlag(tokenizer, stop_strings, len(input_ids))
    streamer = _Streamer(tokenizer, out, stop_strings)
    config = sampling.generation_config(model.generation_config, min_new_tokens)
    config.eos_token_id = eos_token_ids(model, tokenizer) or None
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
    with _ctrl_c_sets(flag):
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([flag]))
        except KeyboardInterrupt:
            flag.interrupted = True
            streamer.end()
    return Reply(streamer.shown.strip(), streamer.ids, streamer.stats(len(input_ids), flag.interrupted))


def plain_transcript(messages: Sequence[Message]) -> str:
    """The conversation as ``System:``/``User:``/``Assistant:`` lines, ending with ``Assistant:``."""
    return "\n".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages) + "\nAssistant:"


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of ``messages`` followed by the start of the assistant's turn."""
    if not tokenizer.chat_template:
        return tokenizer(plain_transcript(messages))["input_ids"]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
        # Some templates (Gemma's) reject a system role: put the system text in the first user turn.
        rest = [dict(m) for m in messages[1:]]
        if rest:
            rest[0]["content"] = f"{messages[0]['content']}\n\n{rest[0]['content']}"
        text = tokenizer.apply_chat_template(rest, add_generation_prompt=True, tokenize=False)
    # The template writes its special tokens (BOS included) itself, as apply_chat_template(tokenize=True) does.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Conversation:
    """History of user/assistant turns plus a system prompt, fitted to ``budget`` prompt tokens."""

    tokenizer: Any
    budget: int
    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.tokenizer.chat_template else PLAIN_STOPS

    def _with_system(self, messages: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def reset(self) -> None:
        """Forget all turns (the system prompt stays)."""
        self.messages.clear()

    def prepare(self, user_text: str) -> tuple[list[int], int]:
        """Prompt ids for a new user message and how many of the oldest turns were dropped to fit.

        Raises ``PromptTooLongError`` (history untouched) when the message does not fit on its own.
        """
        user = [{"role": "user", "content": user_text}]
        alone = len(render_prompt(self.tokenizer, self._with_system(user)))
        if alone > self.budget:
            raise PromptTooLongError(
                f"prompt too long: {alone} tokens (with the system prompt and template), but only {self.budget} "
                f"fit (context window minus the tokens kept for the reply); it was not sent")
        dropped = 0
        while True:
            ids = render_prompt(self.tokenizer, self._with_system(self.messages + user))
            if len(ids) <= self.budget or not self.messages:
                return ids, dropped
            del self.messages[:2]
            dropped += 1

    def add(self, user_text: str, reply: str) -> None:
        """Append one finished turn."""
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]


class ChatSession:
    """A model, its tokenizer, the conversation and the stats of the last reply."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, sampling: Sampling,
                 max_context: int | None = None, system: str | None = None, out: TextIO | None = None,
                 notices: TextIO | None = None) -> None:
        window = context_window(model, tokenizer)
        max_context = max_context or window
        if max_context > window:
            raise ValueError(f"--max-context {max_context} exceeds the model's context window of {window} tokens")
        budget = max_context - sampling.max_new_tokens
        if budget < 1:
            raise ValueError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in a "
                             f"context of {max_context} tokens")
        self.model, self.tokenizer, self.sampling, self.max_context = model, tokenizer, sampling, max_context
        self.conversation = Conversation(tokenizer, budget, system or None)
        self.out = out or sys.stdout
        self.notices = notices or sys.stderr
        self.last: ReplyStats | None = None
        self.context_tokens = 0
        if not tokenizer.chat_template:
            self.notice(NO_TEMPLATE_NOTICE)

    def notice(self, text: str) -> None:
        """One line on the notices stream (stderr), so that stdout carries replies only."""
        print(text, file=self.notices, flush=True)

    def ask(self, user_text: str) -> Reply:
        """Send a message, stream the reply to ``out`` and add the turn to the history.

        Raises ``PromptTooLongError`` when the message alone does not fit the context.
        """
        ids, dropped = self.conversation.prepare(user_text)
        if dropped:
            self.notice(f"[context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)} of the conversation]")
        reply = generate_reply(self.model, self.tokenizer, ids, self.sampling, self.out,
                               self.conversation.stop_strings)
        self.out.write("\n")
        self.out.flush()
        if reply.stats.interrupted:
            self.notice("[interrupted]")
        self.conversation.add(user_text, reply.text)
        self.last = reply.stats
        self.context_tokens = len(ids) + reply.stats.new_tokens
        return reply

    def stats_text(self) -> str:
        """What ``/stats`` prints."""
        c = self.conversation
        lines = [f"history: {c.turns} turn{'s' * (c.turns != 1)}, {self.context_tokens} tokens in the last exchange "
                 f"(context {self.max_context}, {self.sampling.max_new_tokens} kept for the reply)"]
        s = self.last
        if s is None:
            lines.append("last reply: none yet")
        else:
            lines.append(f"last reply: prompt {s.prompt_tokens} tokens in {s.prefill_seconds:.2f} s "
                         f"({s.prompt_tokens_per_second:.1f} tokens/s); decode {s.new_tokens} tokens in "
                         f"{s.decode_seconds:.2f} s ({s.decode_tokens_per_second:.1f} tokens/s)"
                         + (", interrupted" if s.interrupted else ""))
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a ``/command``; False when the chat should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.conversation.reset()
            self.context_tokens = 0
            print("history cleared", file=self.out, flush=True)
        elif name == "/system":
            self.conversation.system = arg or None
            print(f"system prompt set: {arg}" if arg else "system prompt cleared", file=self.out, flush=True)
        elif name == "/stats":
            print(self.stats_text(), file=self.out, flush=True)
        elif name == "/help":
            print(COMMANDS_HELP, file=self.out, flush=True)
        else:
            print(f"unknown command {name}; /help lists them", file=self.out, flush=True)
        return True


def context_window(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """Positions the model can attend over: ``max_position_embeddings`` (or GPT-2's ``n_positions``),
    else the tokenizer's ``model_max_length``."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**8:  # transformers uses a huge int for "unknown"
        return length
    raise ValueError("cannot tell the model's context window: pass --max-context")


def load_chat_model(name_or_path: str, device: str = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A generation-capable model (quantized or not) and its tokenizer."""
    from llmq.assets import load_tokenizer, resolve_model
    from llmq.checkpoint import load_model

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    path = Path(resolve_model(name_or_path))
    model = load_model(path, device=device, dtype=dtype)
    if not hasattr(model, "generate") or not model.can_generate():
        raise ValueError(f"{name_or_path} ({type(model).__name__}) is not a text-generation model")
    return model, load_tokenizer(path)


def describe_model(model: nn.Module) -> str:
    """``rtn int4 g128 asym, float32 on cpu`` (or ``unquantized, ...``)."""
    from llmq.config import QuantConfig

    qc = getattr(model.config, "quantization_config", None)
    kind = QuantConfig.from_dict(qc).describe() if isinstance(qc, dict) else "unquantized"
    return f"{kind}, {str(model.dtype).removeprefix('torch.')} on {model.device}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llmq chat``."""
    p.add_argument("--model", default="smollm2-135m",
                   help="quantized or unquantized checkpoint: folder, hub id or bundled name (smollm2-135m)")
    p.add_argument("--prompt", help="one-shot: print the reply to TEXT and exit ('-' reads it from stdin)")
    p.add_argument("--system", help="initial system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = off (default 50)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context window to keep the conversation in (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default: float32 on CPU, the checkpoint's on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)")


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``llmq chat``."""
    add_arguments(sub.add_parser("chat", help="chat with a checkpoint in the terminal, streaming replies"))


def _stdin_encoding() -> str:
    return codecs.lookup(sys.stdin.encoding or "utf-8").name.upper()


def _read_line() -> str:
    """One line of the conversation, without its newline: through ``input()`` (line editing) on a
    terminal, else read as bytes, so that a line that is not text is skipped alone rather than
    ending the session. ``EOFError`` at the end; ``UnicodeError`` for a line that is not text."""
    encoding = _stdin_encoding()
    try:
        if sys.stdin.isatty():
            # Decoding strictly, input() raises; with surrogateescape, bad bytes arrive as surrogates.
            return input(PROMPT).encode(encoding, "surrogateescape").decode(encoding)
        print(PROMPT, end="", flush=True)  # as input() does without a terminal
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise EOFError
        return raw.decode(encoding).removesuffix("\n")
    except UnicodeError:
        raise UnicodeError(f"not valid {encoding} text") from None


def _interactive(session: ChatSession, model_name: str) -> None:
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    session.notice(f"llmq chat: {model_name} ({describe_model(session.model)}), context {session.max_context} "
                   f"tokens, replies up to {session.sampling.max_new_tokens} tokens. /help lists commands.")
    while True:
        try:
            line = _read_line()
        except EOFError:
            print(file=session.out)
            return
        except KeyboardInterrupt:
            print(file=session.out)
            session.notice("(/exit or Ctrl-D quits)")
            continue
        except UnicodeError as e:
            session.notice(f"({e}: line ignored)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        try:
            session.ask(line)
        except PromptTooLongError as e:
            session.notice(str(e))


def run(args: argparse.Namespace) -> int:
    """Run ``llmq chat``; the exit status (130 when a one-shot reply was interrupted)."""
    sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be positive, got {args.max_context}")
    prompt = args.prompt
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode(_stdin_encoding())
        except UnicodeError:
            raise ValueError(f"--prompt -: stdin is not valid {_stdin_encoding()} text") from None
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_chat_model(args.model, args.device, DTYPES.get(args.dtype))
    session = ChatSession(model, tokenizer, sampling, args.max_context, args.system)
    if prompt is None:
        _interactive(session, args.model)
        return 0
    reply = session.ask(prompt.strip())
    return 130 if reply.stats.interrupted else 0


def cmd_chat(args: argparse.Namespace) -> None:
    """``llmq chat`` handler for ``llmq.cli``."""
    try:
        code = run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading, or at a one-shot prompt read from stdin
        code = 130
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``scripts/chat.py``): ``llmq chat`` with these arguments."""
    from llmq.cli import main as cli_main

    return cli_main(["chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
