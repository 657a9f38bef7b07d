"""Calibration samples: text to token slices, from the bundled corpus, text files or a hub dataset.

``SOURCE`` strings: ``bundled`` (default), a text file path (several joined with ``,``), or
``hf:NAME[:CONFIG]:SPLIT:FIELD`` for a hub dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The bundled corpus is split by document: calibration draws from the first part, the
# encoder evaluation from the rest, so that no evaluated sentence was seen during calibration.
CALIBRATION_DOCS = 8000
EVAL_TEXT_NAMES = ("wiki.test.raw",)


@dataclass
class Calibration:
    """``input_ids`` ``[nsamples, seqlen]`` and how they were drawn (recorded in the checkpoint)."""

    input_ids: torch.Tensor
    source: str
    seed: int
    chat_template: bool
    special_tokens: list[int] = field(default_factory=list)  # the framing each sample got, e.g. BERT's [CLS] and [SEP]

    def describe(self) -> dict[str, Any]:
        n, seqlen = self.input_ids.shape
        return {"calibration": {"source": self.source, "nsamples": n, "seqlen": seqlen, "seed": self.seed,
                                "chat_template": self.chat_template, "special_tokens": self.special_tokens}}


def special_framing(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after a text by default (BERT: ``[CLS]`` and
    ``[SEP]``; Llama: the BOS token; many decoders: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(framed) - len(plain) + 1):
        if framed[i:i + len(plain)] == plain:
            return framed[:i], framed[i + len(plain):]
    return [], []


def calibration_files(source: str) -> list[Path]:
    """The local files a calibration ``source`` names (none for ``bundled`` and ``hf:...``)."""
    if source == "bundled" or source.startswith("hf:"):
        return []
    return [Path(part).expanduser() for part in source.split(",")]


def load_texts(source: str) -> list[str]:
    """The documents of a calibration ``source`` (see the module docstring)."""
    from llmq import assets

    if source == "bundled":
        return assets.bundled_corpus()[:CALIBRATION_DOCS]
    if source.startswith("hf:"):
        return [t for t in hub_rows(source) if t.strip()]
    texts = []
    for path in calibration_files(source):
        if not path.is_file():
            raise FileNotFoundError(f"calibration source {str(path)!r} is not 'bundled', 'hf:...' or a text file")
        if path.name in EVAL_TEXT_NAMES:
            raise ValueError(f"calibration text {path} is the evaluation corpus: calibrate on other text")
        texts.append(read_text(path, "calibration file"))
    return texts


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (CRLF read as LF); a one-line ``ValueError`` naming ``what`` and the
    file when it is not UTF-8 text (a binary file, say)."""
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None


def hub_rows(source: str) -> list[str]:
    """The string values of one field of a hub dataset split, ``source`` = ``hf:NAME[:CONFIG]:SPLIT:FIELD``
    (empty rows included)."""
    parts = source[3:].split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"a hub dataset is named hf:NAME[:CONFIG]:SPLIT:FIELD, got {source!r}")
    name, config, split, field = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    try:
        import datasets

        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds; the user needs one line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"cannot load hub dataset {source!r}: {first}") from None
    if field not in data.column_names:
        raise ValueError(f"dataset {name!r} has no field {field!r} (fields: {', '.join(data.column_names)})")
    return [t for t in data[field] if isinstance(t, str)]


def _chat_wrap(tokenizer, text: str) -> str:
    topic = " ".join(text.split()[:6])
    messages = [{"role": "user", "content": f"Tell me about {topic}"}, {"role": "assistant", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def get_calibration(
    tokenizer,
    source: str = "bundled",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    chat_template: bool = False,
) -> Calibration:
    """``nsamples`` random slices of ``seqlen`` tokens (seeded) from the documents of ``source``.

    Documents are joined with blank lines and tokenized without special tokens; when
    ``chat_template`` is set each document is first wrapped as an assistant reply. Each slice is
    framed the way the tokenizer frames any text (:func:`special_framing`, counted in ``seqlen``),
    so that the model sees the tokens it always sees in use: an encoder's ``[CLS]`` and ``[SEP]``
    carry some of its largest activations.
    """
    if nsamples <= 0 or seqlen <= 1:
        raise ValueError(f"calibration needs nsamples > 0 and seqlen > 1, got {nsamples} and {seqlen}")
    texts = load_texts(source)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template asked for, but the tokenizer has no chat template")
        texts = [_chat_wrap(tokenizer, t) for t in texts]
    gen = torch.Generator().manual_seed(seed)
    # Tokenize documents in a seeded random order until there are enough tokens for distinct slices.
    order = torch.randperm(len(texts), generator=gen).tolist()
    needed = max(nsamples * seqlen * 4, seqlen + 1)
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    prefix, suffix = special_framing(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"calibration seqlen {seqlen} leaves no room for text between the tokenizer's "
                         f"{len(prefix) + len(suffix)} special tokens")
    if len(ids) <= body:
        raise ValueError(f"calibration source {source!r} has only {len(ids)} tokens, fewer than seqlen {seqlen}")
    tokens = torch.tensor(ids, dtype=torch.long)
    starts = torch.randint(0, len(ids) - body, (nsamples,), generator=gen)
    head, tail = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    samples = torch.stack([torch.cat([head, tokens[s:s + body], tail]) for s in starts.tolist()])
    return Calibration(samples, source, seed, chat_template, prefix + suffix)
