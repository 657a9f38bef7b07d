"""Bad, careless and hostile inputs to the ``llmq`` command line, each built in a scratch folder
and run as a user would: prints one table row per case with the command, its exit status, its
message, what is on disk afterwards and whether every input is unchanged (checksums).

    python scripts/hostile_inputs.py                 # every case, a markdown table on stdout
    python scripts/hostile_inputs.py --only nan      # the cases whose name contains "nan"
    python scripts/hostile_inputs.py --in-process    # faster: no interpreter start per plain case

Exits 1 when a case does not end as expected (exit status, message, inputs, leftovers).
``tests/test_hostile_inputs.py`` runs the same cases in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
TIMEOUT = 600
# GPTQ on a model of many blocks (slow_model): seconds of work left after its first block is written.
SLOW = ["--method", "gptq", "--nsamples", "32", "--calib-seqlen", "64", "--calib", "calib.txt", "--group-size", "32"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


# ---------------------------------------------------------------------------------------------
# Building blocks: a tiny Llama with a byte-level tokenizer, its quantized form, raw shard edits.


def tiny_llama(folder: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random Llama (vocabulary of the 256 bytes) with a byte-level tokenizer, saved as safetensors."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"], bos_token_id=None, eos_token_id=0)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite ``folder/model.safetensors`` with ``edit`` applied to its tensors."""
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def raw_shard(path: Path, header: dict | list, data: bytes, header_len: int | None = None) -> None:
    """A safetensors file written byte by byte (to lie in its header)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes((len(blob) if header_len is None else header_len).to_bytes(8, "little") + blob + data)


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    write_json(path, data)


def read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable, also for root (the immutable attribute); False when impossible here."""
    folder.chmod(0o555)
    if _writable(folder):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    return not _writable(folder)


def writable_again(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o755)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


# ---------------------------------------------------------------------------------------------
# Cases. ``setup(root)`` builds the inputs inside ``root`` and returns the command's arguments
# (paths relative to ``root``, the working directory). ``run`` replaces the plain run when a
# case needs signals, a second process or stdin.


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]
    code: int
    message: str = ""  # expected in stderr (in its only line when the code is 2)
    also: tuple[str, ...] = ()  # further words expected in stderr
    inputs: tuple[str, ...] = ("m",)  # paths that must be unchanged afterwards
    forbid: tuple[str, ...] = ()  # must not appear in stdout or stderr
    absent: tuple[str, ...] = ()  # paths that must not exist afterwards
    present: tuple[str, ...] = ()  # paths that must exist afterwards
    check: Callable[[Path, Result], str | None] | None = None  # extra check: a complaint or None
    run: Callable[[Path, list[str]], Result] | None = None
    subprocess_only: bool = False  # signals, several processes, stdin, umask: not in-process
    resumable: bool = False  # leaves its temporary folder and lock beside the output, for --resume
    note: str = ""  # how the command was run, when not plainly
    cleanup: Callable[[Path], None] | None = None


CASES: list[Case] = []


def case(name: str, code: int, message: str = "", **kw) -> Callable:
    def register(setup: Callable[[Path], list[str]]) -> Callable:
        CASES.append(Case(name, setup, code, message, **kw))
        return setup
    return register


def base(root: Path, name: str = "m") -> Path:
    """A fresh copy of the tiny model at ``root/name`` (built once per process)."""
    shutil.copytree(_cached("tiny", lambda p: tiny_llama(p)), root / name, symlinks=True)
    return root / name


def quantized(root: Path, name: str = "q") -> Path:
    """A fresh copy of the tiny model quantized with RTN int4 g32 at ``root/name``."""
    def build(p: Path) -> None:
        from llmq import QuantConfig
        from llmq.pipeline import quantize

        quantize(_cached("tiny", lambda t: tiny_llama(t)), QuantConfig(bits=4, group_size=32), p, progress=False)
    shutil.copytree(_cached("tiny-q", build), root / name, symlinks=True)
    return root / name


def slow_model(root: Path) -> Path:
    shutil.copytree(_cached("slow", lambda p: tiny_llama(p, layers=24, hidden=128)), root / "m")
    (root / "calib.txt").write_text(TEXT * 40)
    return root / "m"


_CACHE: dict[str, Path] = {}


def _cached(key: str, build: Callable[[Path], object]) -> Path:
    if key not in _CACHE:
        path = Path(tempfile.mkdtemp(prefix="llmq-hostile-cache-")) / key
        build(path)
        _CACHE[key] = path
    return _CACHE[key]


TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n\n")
EVAL = ["--dataset", "text.txt", "--seqlen", "32", "--max-windows", "2"]


def with_text(root: Path) -> None:
    (root / "text.txt").write_text(TEXT * 20)


# --- Data loss ---------------------------------------------------------------------------------

@case("out-is-input", 2, "is the input model")
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "m", "--overwrite"]


@case("out-is-input-via-symlink", 2, "is the input model")
def _(root):
    base(root)
    (root / "alias").symlink_to("m")
    return ["quantize", "--model", "m", "--out", "alias", "--overwrite"]


@case("out-is-parent-of-input", 2, "contains the input model", inputs=("models",))
def _(root):
    (root / "models").mkdir()
    base(root / "models")
    (root / "models" / "notes.txt").write_text("unrelated work\n")
    return ["quantize", "--model", "models/m", "--out", "models", "--overwrite"]


@case("out-inside-input", 2, "lies inside the input model", absent=("m/q",))
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "m/q"]


@case("out-is-calibration-file", 2, "is the calibration file", inputs=("m", "calib.txt"))
def _(root):
    base(root)
    (root / "calib.txt").write_text(TEXT * 10)
    return ["quantize", "--model", "m", "--method", "gptq", "--calib", "calib.txt", "--out", "calib.txt",
            "--overwrite"]


@case("out-contains-calibration-file", 2, "contains the calibration file", inputs=("m", "data"))
def _(root):
    base(root)
    (root / "data").mkdir()
    (root / "data" / "calib.txt").write_text(TEXT * 10)
    return ["quantize", "--model", "m", "--method", "gptq", "--calib", "data/calib.txt", "--out", "data",
            "--overwrite"]


@case("out-is-a-file", 2, "is a file", inputs=("m", "notes.txt"))
def _(root):
    base(root)
    (root / "notes.txt").write_text("keep me\n")
    return ["quantize", "--model", "m", "--out", "notes.txt", "--overwrite"]


@case("out-is-not-a-checkpoint", 2, "is not a checkpoint folder", inputs=("m", "home"))
def _(root):
    base(root)
    (root / "home").mkdir()
    (root / "home" / "thesis.tex").write_text("years of work\n")
    return ["quantize", "--model", "m", "--out", "home", "--overwrite"]


@case("out-exists", 2, "already exists", inputs=("m", "q"))
def _(root):
    base(root)
    quantized(root)
    return ["quantize", "--model", "m", "--out", "q"]


def _replaced(root: Path, _res: Result) -> str | None:
    if (root / "q" / "stale.txt").exists():
        return "the old output was not replaced"
    if not (root / "q" / "model.safetensors").exists():
        return "no new output"
    return None


@case("overwrite-replaces-output", 0, present=("q/config.json",), check=_replaced)
def _(root):
    base(root)
    quantized(root)
    (root / "q" / "stale.txt").write_text("from the previous run\n")
    return ["quantize", "--model", "m", "--out", "q", "--overwrite"]


def _concurrent(root: Path, argv: list[str]) -> Result:
    procs = [subprocess.Popen(_cli(argv), cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    failed = [err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    return Result(max(p.returncode for p in procs), "".join(o for o, _ in outs), failed[0] if failed else "")


def _one_refused(_root: Path, res: Result) -> str | None:
    """The other run succeeded (its output is there); this one was refused as busy, or, when the
    other had already finished, as existing: never both."""
    refused = "is being written by another llmq run" in res.stderr or "already exists" in res.stderr
    return None if refused and "wrote " in res.stdout else "not one success and one refusal"


@case("concurrent-same-out", 2, present=("q/config.json",), run=_concurrent, subprocess_only=True,
      check=_one_refused, inputs=("m", "calib.txt"),
      note="two runs started together; the row shows the one refused")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


def _appears(root: Path, argv: list[str]) -> Result:
    """Someone else creates the output folder while llmq quantizes (just before llmq renames its result)."""
    code = ("import sys, pathlib\n"
            "from llmq import checkpoint, cli\n"
            "copy = checkpoint.copy_side_files\n"
            "def copy_and_appear(src, dst):\n"
            "    copy(src, dst)\n"
            "    pathlib.Path('q').mkdir()\n"
            "    pathlib.Path('q/theirs.txt').write_text('written by another program')\n"
            "checkpoint.copy_side_files = copy_and_appear\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=root, env=ENV, capture_output=True, text=True,
                       timeout=TIMEOUT)
    return Result(r.returncode, r.stdout, r.stderr)


def _theirs_kept(root: Path, _res: Result) -> str | None:
    theirs = root / "q" / "theirs.txt"
    return None if theirs.is_file() and sorted(p.name for p in (root / "q").iterdir()) == ["theirs.txt"] \
        else "the folder that appeared was replaced"


@case("out-appears-during-run", 2, "appeared while", run=_appears, subprocess_only=True, check=_theirs_kept,
      note="q created by another program while llmq runs")
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "q"]


_HELD: dict[str, contextlib.AbstractContextManager] = {}


def _release(root: Path) -> None:
    """End the held run as a failed one would (nothing is renamed into place)."""
    _HELD.pop(str(root)).__exit__(RuntimeError, RuntimeError("released"), None)


@case("out-locked-by-live-run", 2, "is being written by another llmq run", absent=("q",), cleanup=_release,
      note="while this script holds q's lock as a run would")
def _(root):
    from llmq import outdir

    base(root)
    _HELD[str(root)] = held = outdir.atomic_output(root / "q")
    held.__enter__()
    return ["quantize", "--model", "m", "--out", "q"]


def _sigkill_then_rerun(root: Path, argv: list[str], extra: tuple[str, ...] = ()) -> Result:
    p = subprocess.Popen(_cli(argv), cwd=root, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_partial(root, p)
    p.kill()
    p.wait()
    again = subprocess.run(_cli([*argv, *extra]), cwd=root, env=ENV, capture_output=True, text=True,
                           timeout=TIMEOUT)
    return Result(again.returncode, again.stdout, again.stderr)


def _rm_command_works(root: Path, res: Result) -> str | None:
    """The reported command removes the leftovers, after which the run succeeds."""
    if "rm -rf -- " not in res.stderr:
        return "no command to remove the leftovers"
    command = res.stderr[res.stderr.index("rm -rf -- "):].strip().splitlines()[0]
    if not any(p.name.startswith(".tmp-q-") for p in root.iterdir()):
        return "no partial output left to report"
    subprocess.run(command, shell=True, cwd=root, check=True)
    left = [p.name for p in root.iterdir() if p.name.startswith(".")]
    if left:
        return f"left after the reported command: {left}"
    r = subprocess.run(_cli(["quantize", "--model", "m", "--out", "q"]), cwd=root, env=ENV, capture_output=True,
                       text=True, timeout=TIMEOUT)
    return None if r.returncode == 0 else f"rerun after removal failed: {r.stderr.strip()}"


@case("sigkill-leftovers-reported", 2, "stopped without finishing", also=("continue it: llmq quantize", "--resume"),
      run=_sigkill_then_rerun, subprocess_only=True, resumable=True, inputs=("m", "calib.txt"),
      check=_rm_command_works, note="SIGKILL mid-run, then the same command again")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


def _sigkill_then(extra: tuple[str, ...]) -> Callable[[Path, list[str]], Result]:
    """SIGKILL mid-run, then the same command with ``extra`` arguments."""
    return lambda root, argv: _sigkill_then_rerun(root, argv, extra)


def _complete(root: Path, _res: Result) -> str | None:
    left = [p.name for p in root.iterdir() if p.name.startswith(".")]
    return f"left behind: {left}" if left else None


@case("sigkill-then-resume", 0, present=("q/model.safetensors",), run=_sigkill_then(("--resume",)),
      subprocess_only=True, inputs=("m", "calib.txt"), check=_complete,
      note="SIGKILL mid-run, then the same command with --resume")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


def _kept(root: Path, _res: Result) -> str | None:
    if not list(root.glob(".tmp-q-*/.llmq-resume/progress.json")) or not (root / ".q.llmq-lock").exists():
        return "the stopped run's finished blocks were not kept"
    return None


@case("resume-with-other-arguments", 2, "cannot resume: bits was 4 in the stopped run, 3 in this one",
      run=_sigkill_then(("--resume", "--bits", "3")), subprocess_only=True, resumable=True, absent=("q",),
      inputs=("m", "calib.txt"), check=_kept, note="SIGKILL mid-run, then --resume with --bits 3")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


def _signalled(sig: int) -> Callable[[Path, list[str]], Result]:
    def run(root: Path, argv: list[str]) -> Result:
        p = subprocess.Popen(_cli(argv), cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_partial(root, p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=TIMEOUT)
        return Result(p.returncode, out, err)
    return run


def _resumes(root: Path, res: Result) -> str | None:
    """The stopped run printed the command that continues it, which completes the output."""
    if res.stdout.strip():
        return "misleading output on stdout"
    last = _lines(res.stderr)[-1]
    if "continue with: llmq quantize " not in last:
        return "no command to continue the run"
    not_kept = _kept(root, res)
    if not_kept:
        return not_kept
    argv = shlex.split(last[last.index("continue with: ") + len("continue with: "):])[1:]
    r = subprocess.run(_cli(argv), cwd=root, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0 or not (root / "q" / "model.safetensors").exists():
        return f"the printed command failed: {r.stderr.strip()[-300:]}"
    return _complete(root, res)


@case("sigterm-mid-run", 143, "stopped by SIGTERM", run=_signalled(signal.SIGTERM), subprocess_only=True,
      resumable=True, absent=("q",), inputs=("m", "calib.txt"), check=_resumes, forbid=("Traceback",),
      note="SIGTERM mid-run, then the command it prints")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


@case("sigint-mid-run", 130, "stopped by SIGINT", run=_signalled(signal.SIGINT), subprocess_only=True,
      resumable=True, absent=("q",), inputs=("m", "calib.txt"), check=_resumes,
      forbid=("Traceback", "KeyboardInterrupt"), note="Ctrl-C (SIGINT) mid-run, then the command it prints")
def _(root):
    slow_model(root)
    return ["quantize", "--model", "m", "--out", "q", *SLOW]


def _wait_for_partial(root: Path, p: subprocess.Popen) -> None:
    """Until the run has finished its first block (recorded in the temporary folder beside the output)."""
    deadline = time.monotonic() + TIMEOUT
    while not any(root.glob(".tmp-q-*/.llmq-resume/progress.json")):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise RuntimeError("the run ended before it could be signalled")
        time.sleep(0.02)


@case("json-into-input", 2, "--json", absent=("q",))
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "q", "--json", "m/config.json"]


@case("json-is-a-folder", 2, "--json", absent=("q",), inputs=("m", "reports"))
def _(root):
    base(root)
    (root / "reports").mkdir()
    return ["quantize", "--model", "m", "--out", "q", "--json", "reports"]


# --- Reading outside the checkpoint ------------------------------------------------------------

def _index_pointing(root: Path, target: str) -> None:
    """``m`` with an index whose every entry names ``target``; ``outside/`` holds a copy of the real shard."""
    m = base(root)
    (root / "outside").mkdir()
    shutil.move(m / "model.safetensors", root / "outside" / "model.safetensors")
    keys = [k for k in header_of(root / "outside" / "model.safetensors")[0] if k != "__metadata__"]
    write_json(m / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict.fromkeys(keys, target)})


SECRET = ("size", "bytes", "exist", "missing", "No such file", "passwd:")


@case("index-names-parent-folder", 2, "outside the checkpoint folder", absent=("q",), inputs=("m", "outside"),
      forbid=SECRET)
def _(root):
    _index_pointing(root, "../outside/model.safetensors")
    return ["quantize", "--model", "m", "--out", "q"]


@case("index-names-absolute-path", 2, "outside the checkpoint folder", absent=("q",), forbid=SECRET)
def _(root):
    _index_pointing(root, "/etc/passwd")
    return ["quantize", "--model", "m", "--out", "q"]


@case("index-names-missing-outside-file", 2, "outside the checkpoint folder", absent=("q",), forbid=SECRET)
def _(root):
    _index_pointing(root, "../../../../no/such/file.safetensors")
    return ["quantize", "--model", "m", "--out", "q"]


@case("eval-index-names-parent-folder", 2, "outside the checkpoint folder", inputs=("q", "outside"), forbid=SECRET)
def _(root):
    q = quantized(root)
    with_text(root)
    (root / "outside").mkdir()
    shutil.move(q / "model.safetensors", root / "outside" / "model.safetensors")
    keys = [k for k in header_of(root / "outside" / "model.safetensors")[0] if k != "__metadata__"]
    write_json(q / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": dict.fromkeys(keys, "../outside/model.safetensors")})
    return ["eval", "--model", "q", *EVAL]


@case("inspect-shard-symlink-outside", 2, "outside the checkpoint folder", inputs=("q", "outside"), forbid=SECRET)
def _(root):
    q = quantized(root)
    (root / "outside").mkdir()
    shutil.move(q / "model.safetensors", root / "outside" / "model.safetensors")
    (q / "model.safetensors").symlink_to("../outside/model.safetensors")
    return ["inspect", "q"]


@case("shard-symlink-outside", 2, "outside the checkpoint folder", absent=("q",), inputs=("m", "outside"),
      forbid=SECRET)
def _(root):
    m = base(root)
    (root / "outside").mkdir()
    shutil.move(m / "model.safetensors", root / "outside" / "model.safetensors")
    (m / "model.safetensors").symlink_to(root / "outside" / "model.safetensors")
    return ["quantize", "--model", "m", "--out", "q"]


@case("tokenizer-symlink-outside", 2, "outside the checkpoint folder", absent=("q",), inputs=("m", "secret.txt"),
      forbid=("hunter2",))
def _(root):
    m = base(root)
    (root / "secret.txt").write_text("password: hunter2\n")
    (m / "notes.txt").symlink_to("../secret.txt")  # copied beside the output as a side file
    return ["quantize", "--model", "m", "--out", "q"]


@case("hub-cache-layout-accepted", 0, present=("q/config.json",), inputs=("hub",))
def _(root):
    """A Hugging Face cache snapshot: every file is a link into the repository's blobs folder (allowed)."""
    m = base(root)
    snapshot = root / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    blobs = root / "hub" / "models--org--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in m.iterdir():
        shutil.move(f, blobs / f.name)
        (snapshot / f.name).symlink_to(f"../../blobs/{f.name}")
    m.rmdir()
    return ["quantize", "--model", "hub/models--org--tiny/snapshots/abc123", "--out", "q"]


@case("index-not-an-object", 2, "index.json", absent=("q",))
def _(root):
    write_json(base(root) / "model.safetensors.index.json", ["model.safetensors"])
    return ["quantize", "--model", "m", "--out", "q"]


@case("index-weight-map-not-an-object", 2, "weight_map", absent=("q",))
def _(root):
    write_json(base(root) / "model.safetensors.index.json", {"weight_map": ["model.safetensors"]})
    return ["quantize", "--model", "m", "--out", "q"]


@case("index-entry-not-a-string", 2, "weight_map", absent=("q",))
def _(root):
    write_json(base(root) / "model.safetensors.index.json", {"weight_map": {"lm_head.weight": 7}})
    return ["quantize", "--model", "m", "--out", "q"]


# --- Code a checkpoint brings --------------------------------------------------------------------

EVIL = "import pathlib\npathlib.Path(__file__).parent.parent.joinpath('PWNED').write_text('ran')\n"


def _remote_code(root: Path) -> None:
    m = base(root)
    edit_json(m / "config.json", lambda c: c.update(
        model_type="evilnet", architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                  "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    (m / "configuration_evil.py").write_text(EVIL)
    (m / "modeling_evil.py").write_text(EVIL)


REMOTE = {"absent": ("PWNED", "q"), "forbid": ("[y/N]", "Do you wish")}  # q: no output (inspect reads q)


@case("remote-code-quantize", 2, "custom code", **REMOTE)
def _(root):
    _remote_code(root)
    return ["quantize", "--model", "m", "--out", "q"]


@case("remote-code-eval", 2, "custom code", **REMOTE)
def _(root):
    _remote_code(root)
    with_text(root)
    return ["eval", "--model", "m", *EVAL]


@case("remote-code-chat", 2, "custom code", **REMOTE)
def _(root):
    _remote_code(root)
    return ["chat", "--model", "m", "--prompt", "hi", "--max-new-tokens", "2"]


@case("remote-code-inspect", 2, "custom code", inputs=("q",), absent=("PWNED",), forbid=REMOTE["forbid"])
def _(root):
    q = quantized(root)
    edit_json(q / "config.json", lambda c: c.update(
        model_type="evilnet", auto_map={"AutoConfig": "configuration_evil.EvilConfig"}))
    (q / "configuration_evil.py").write_text(EVIL)
    return ["inspect", "q"]


@case("remote-code-tokenizer", 2, "tokenizer", **REMOTE)
def _(root):
    m = base(root)
    (root / "calib.txt").write_text(TEXT * 10)
    edit_json(m / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    (m / "tokenization_evil.py").write_text(EVIL)
    return ["quantize", "--model", "m", "--out", "q", "--method", "gptq", "--calib", "calib.txt",
            "--nsamples", "4", "--calib-seqlen", "32"]


@case("auto-map-of-builtin-model-runs-no-code", 0, present=("q/config.json",), absent=("PWNED",),
      forbid=("[y/N]",))
def _(root):
    """A llama checkpoint that still carries an auto_map: transformers' own class is used, no code runs."""
    m = base(root)
    edit_json(m / "config.json", lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"}))
    (m / "configuration_evil.py").write_text(EVIL)
    return ["quantize", "--model", "m", "--out", "q"]


# --- Weights no grid can hold ---------------------------------------------------------------------

DOWN = "model.layers.0.mlp.down_proj.weight"


def _poison(root: Path, key: str, value: float, index: tuple = (0, 0)) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key][index] = value
    edit_tensors(base(root), edit)


@case("nan-weight-rtn", 2, f"{DOWN} has 1 NaN", absent=("q",))
def _(root):
    _poison(root, DOWN, float("nan"))
    return ["quantize", "--model", "m", "--out", "q"]


@case("inf-weight-rtn", 2, f"{DOWN} has 1 infinite", absent=("q",))
def _(root):
    _poison(root, DOWN, float("inf"))
    return ["quantize", "--model", "m", "--out", "q"]


@case("huge-weight-rtn", 2, "fp16 scales", absent=("q",))
def _(root):
    _poison(root, DOWN, 1e9)
    return ["quantize", "--model", "m", "--out", "q"]


@case("nan-weight-gptq-blames-weight", 2, f"{DOWN} has 1 NaN", absent=("q",), inputs=("m", "calib.txt"),
      forbid=("calibration activations",))
def _(root):
    _poison(root, DOWN, float("nan"))
    (root / "calib.txt").write_text(TEXT * 10)
    return ["quantize", "--model", "m", "--out", "q", "--method", "gptq", "--calib", "calib.txt",
            "--nsamples", "4", "--calib-seqlen", "32"]


def _kept_unquantized(root: Path, res: Result) -> str | None:
    from llmq.checkpoint import load_quantized

    model = load_quantized(root / "q")
    layer = model.model.layers[0].mlp.down_proj
    if type(layer) is not torch.nn.Linear or not torch.isnan(layer.weight).any():
        return "the NaN layer was not kept unquantized"
    return None if "left unquantized" in res.stderr else "no warning"


@case("nan-weight-kept-unquantized", 0, "left unquantized", present=("q/config.json",), check=_kept_unquantized)
def _(root):
    _poison(root, DOWN, float("nan"))
    return ["quantize", "--model", "m", "--out", "q", "--method", "rtn", "--skip-nonfinite"]


@case("nan-in-norm", 2, "model.layers.1.input_layernorm.weight has 1 NaN", absent=("q",))
def _(root):
    _poison(root, "model.layers.1.input_layernorm.weight", float("nan"), (3,))
    return ["quantize", "--model", "m", "--out", "q"]


@case("embedding-beyond-float16", 2, "--dtype", absent=("q",))
def _(root):
    _poison(root, "model.embed_tokens.weight", 1e6)
    return ["quantize", "--model", "m", "--out", "q"]


@case("calibration-activations-overflow", 2, "calibration activations", absent=("q",), inputs=("m", "calib.txt"))
def _(root):
    """Finite weights whose activations overflow in float16 calibration forwards."""
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.embed_tokens.weight"] *= 1e6
    edit_tensors(base(root), edit)
    (root / "calib.txt").write_text(TEXT * 10)
    return ["quantize", "--model", "m", "--out", "q", "--method", "gptq", "--calib", "calib.txt",
            "--nsamples", "4", "--calib-seqlen", "32", "--dtype", "float32", "--calib-dtype", "float16"]


@case("calibration-file-binary", 2, "calib.bin", absent=("q",), inputs=("m", "calib.bin"))
def _(root):
    base(root)
    (root / "calib.bin").write_bytes(bytes(range(256)) * 64)
    return ["quantize", "--model", "m", "--out", "q", "--method", "gptq", "--calib", "calib.bin"]


def _per_channel(root: Path, _res: Result) -> str | None:
    qc = json.loads((root / "q" / "config.json").read_text())["quantization_config"]
    return None if qc["group_size"] == -1 else f"group_size stored as {qc['group_size']}"


@case("group-size-beyond-inputs", 0, present=("q/config.json",), check=_per_channel)
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "q", "--group-size", "100000"]


# --- Quantized checkpoints that lie ---------------------------------------------------------------

QPROJ = "model.layers.0.self_attn.q_proj"


def _bad_q(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    q = quantized(root)
    edit_tensors(q, edit)
    with_text(root)
    return q


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = value(t[key])
    return edit


BAD_LAYERS = {
    "scales-stored-int32": (f"{QPROJ}.scales", lambda s: s.to(torch.int32), "scales"),
    "scales-all-nan": (f"{QPROJ}.scales", lambda s: torch.full_like(s, float("nan")), "scales"),
    "g-idx-out-of-range": (f"{QPROJ}.g_idx", lambda g: g + 5, "g_idx"),
    "g-idx-negative": (f"{QPROJ}.g_idx", lambda g: g - 1, "g_idx"),
    "qweight-wrong-shape": (f"{QPROJ}.qweight", lambda w: torch.cat([w, w]), "qweight"),
    "qweight-stored-float": (f"{QPROJ}.qweight", lambda w: w.float(), "qweight"),
}


def _bad_layer_cases() -> None:
    for name, (key, value, word) in BAD_LAYERS.items():
        for cmd in ("eval", "inspect"):
            def setup(root: Path, key: str = key, value: Callable = value, cmd: str = cmd) -> list[str]:
                _bad_q(root, _set(key, value))
                return ["eval", "--model", "q", *EVAL] if cmd == "eval" else ["inspect", "q"]
            CASES.append(Case(f"{cmd}-{name}", setup, 2, QPROJ, also=(word,), inputs=("q",)))


_bad_layer_cases()


@case("load-norm-stored-int", 2, "model.norm.weight", inputs=("q",))
def _(root):
    _bad_q(root, _set("model.norm.weight", lambda w: w.to(torch.int32)))
    return ["eval", "--model", "q", *EVAL]


@case("quantization-config-not-an-object", 2, "quantization_config", inputs=("q",))
def _(root):
    q = quantized(root)
    edit_json(q / "config.json", lambda c: c.update(quantization_config="gptq"))
    return ["inspect", "q"]


@case("quantization-config-damp-not-a-number", 2, "damp_percent", inputs=("q",))
def _(root):
    q = quantized(root)
    edit_json(q / "config.json", lambda c: c["quantization_config"].update(damp_percent="1%"))
    return ["inspect", "q"]


@case("quantization-config-meta-not-an-object", 2, "meta", inputs=("q",))
def _(root):
    q = quantized(root)
    edit_json(q / "config.json", lambda c: c["quantization_config"].update(meta="llmq"))
    return ["inspect", "q"]


@case("eval-dataset-binary", 2, "data.bin", inputs=("q", "data.bin"))
def _(root):
    quantized(root)
    (root / "data.bin").write_bytes(bytes(range(256)) * 64)
    return ["eval", "--model", "q", "--dataset", "data.bin", "--seqlen", "32", "--max-windows", "2"]


@case("quantize-quantization-config-not-an-object", 2, "quantization_config", absent=("q",))
def _(root):
    edit_json(base(root) / "config.json", lambda c: c.update(quantization_config=["gptq"]))
    return ["quantize", "--model", "m", "--out", "q"]


@case("eval-quantized-control", 0, "", inputs=("q",))
def _(root):
    quantized(root)
    with_text(root)
    return ["eval", "--model", "q", *EVAL]


# --- Config files and shard headers ---------------------------------------------------------------

@case("config-invalid-json", 2, "config.json", absent=("q",))
def _(root):
    (base(root) / "config.json").write_text('{"model_type": "llama",')
    return ["quantize", "--model", "m", "--out", "q"]


@case("config-not-an-object", 2, "config.json", absent=("q",))
def _(root):
    (base(root) / "config.json").write_text("[1, 2, 3]")
    return ["quantize", "--model", "m", "--out", "q"]


@case("config-nested-too-deep", 2, "config.json", absent=("q",))
def _(root):
    (base(root) / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["quantize", "--model", "m", "--out", "q"]


@case("eval-config-invalid-json", 2, "config.json", inputs=("q",))
def _(root):
    (quantized(root) / "config.json").write_text("{not json")
    with_text(root)
    return ["eval", "--model", "q", *EVAL]


@case("generation-config-invalid-json", 2, "generation_config.json", inputs=("q",))
def _(root):
    (quantized(root) / "generation_config.json").write_text("{not json")
    return ["chat", "--model", "q", "--prompt", "hi", "--max-new-tokens", "2"]


def _header_edit(root: Path, edit: Callable[[dict], None]) -> None:
    f = base(root) / "model.safetensors"
    header, data = header_of(f)
    edit(header)
    raw_shard(f, header, data)


def _first_two(header: dict) -> tuple[dict, dict]:
    a, b = sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])[:2]
    return a, b


@case("header-overlapping-ranges", 2, "overlap", absent=("q",))
def _(root):
    def edit(h: dict) -> None:
        a, b = _first_two(h)
        n = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + n]  # b reads a's bytes
    _header_edit(root, edit)
    return ["quantize", "--model", "m", "--out", "q"]


@case("header-offsets-disagree-with-shape", 2, "bytes", absent=("q",))
def _(root):
    def edit(h: dict) -> None:
        a, _ = _first_two(h)
        a["shape"] = [a["shape"][0] * 2, *a["shape"][1:]]
    _header_edit(root, edit)
    return ["quantize", "--model", "m", "--out", "q"]


@case("header-negative-dimension", 2, "shape", absent=("q",))
def _(root):
    def edit(h: dict) -> None:
        a, _ = _first_two(h)
        a["shape"] = [-1, *a["shape"][1:]]
    _header_edit(root, edit)
    return ["quantize", "--model", "m", "--out", "q"]


@case("header-not-an-object", 2, "corrupt", absent=("q",))
def _(root):
    raw_shard(base(root) / "model.safetensors", [1, 2, 3], b"")
    return ["quantize", "--model", "m", "--out", "q"]


@case("header-nested-too-deep", 2, "corrupt", absent=("q",))
def _(root):
    f = base(root) / "model.safetensors"
    f.write_bytes((200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
    return ["quantize", "--model", "m", "--out", "q"]


@case("header-huge-length", 2, "header length", absent=("q",))
def _(root):
    f = base(root) / "model.safetensors"
    header, data = header_of(f)
    raw_shard(f, header, data, header_len=2**62)
    return ["quantize", "--model", "m", "--out", "q"]


@case("duplicate-tensor-across-shards", 2, "in two shards", absent=("q",))
def _(root):
    """Two shards hold the same tensor (different values); the index names the second for it."""
    m = base(root)
    tensors = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    twice = "model.norm.weight"
    save_file(tensors, m / first)
    save_file({twice: tensors[twice] * 2}, m / second)
    write_json(m / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": {**dict.fromkeys(tensors, first), twice: second}})
    return ["quantize", "--model", "m", "--out", "q"]


# --- The output folder itself ----------------------------------------------------------------------

@case("out-read-only", 2, "cannot write", absent=("ro/q",), inputs=("m", "ro"),
      cleanup=lambda root: writable_again(root / "ro"))
def _(root):
    base(root)
    (root / "ro").mkdir()
    if not read_only(root / "ro"):
        raise RuntimeError("cannot make a read-only folder here")
    return ["quantize", "--model", "m", "--out", "ro/q"]


@case("out-below-a-file", 2, "notes.txt", inputs=("m", "notes.txt"))
def _(root):
    base(root)
    (root / "notes.txt").write_text("keep me\n")
    return ["quantize", "--model", "m", "--out", "notes.txt/q"]


def _umask_027(root: Path, argv: list[str]) -> Result:
    r = subprocess.run(_cli(argv), cwd=root, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
                       preexec_fn=lambda: os.umask(0o027))
    return Result(r.returncode, r.stdout, r.stderr)


def _mode_750(root: Path, _res: Result) -> str | None:
    mode = (root / "q").stat().st_mode & 0o777
    return None if mode == 0o750 else f"output folder mode {mode:o}, umask 027 asks for 750"


@case("output-mode-follows-umask", 0, present=("q/config.json",), run=_umask_027, subprocess_only=True,
      check=_mode_750, note="run with umask 027")
def _(root):
    base(root)
    return ["quantize", "--model", "m", "--out", "q"]


# --- Chat's stdin ------------------------------------------------------------------------------------

def _chat_stdin(data: bytes) -> Callable[[Path, list[str]], Result]:
    def run(root: Path, argv: list[str]) -> Result:
        r = subprocess.run(_cli(argv), cwd=root, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"}, input=data,
                           capture_output=True, timeout=TIMEOUT)
        return Result(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))
    return run


def _answered_after_bad_line(_root: Path, res: Result) -> str | None:
    return None if res.stdout.count("you> ") >= 4 else "the session did not go on after the bad line"


@case("chat-invalid-utf8-line", 0, "not valid UTF-8", inputs=("q",), run=_chat_stdin(b"hi\n\xff\xfe oops\nbye\n"),
      subprocess_only=True, check=_answered_after_bad_line, note="stdin: 'hi', bytes ff fe, 'bye'")
def _(root):
    quantized(root)
    return ["chat", "--model", "q", "--greedy", "--max-new-tokens", "2"]


@case("chat-prompt-stdin-invalid-utf8", 2, "not valid UTF-8", inputs=("q",), run=_chat_stdin(b"\xff\xfe hi\n"),
      subprocess_only=True, note="stdin: bytes ff fe")
def _(root):
    quantized(root)
    return ["chat", "--model", "q", "--prompt", "-", "--max-new-tokens", "2"]


# ---------------------------------------------------------------------------------------------
# Running and reporting.


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmq.cli", *argv]


def run_subprocess(root: Path, argv: list[str]) -> Result:
    r = subprocess.run(_cli(argv), cwd=root, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    return Result(r.returncode, r.stdout, r.stderr)


def run_in_process(root: Path, argv: list[str]) -> Result:
    """``llmq.cli.main`` in this process (tests: no interpreter start per case)."""
    from llmq import cli

    out, err = io.StringIO(), io.StringIO()
    # transformers logs through a handler bound to the stderr of its import: listen to it as well.
    listener = logging.StreamHandler(err)
    logging.getLogger("transformers").addHandler(listener)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
        logging.getLogger("transformers").removeHandler(listener)
    return Result(code, out.getvalue(), err.getvalue())


def digest(path: Path) -> str:
    """Checksum of a file or folder: names, contents, link targets and permission bits."""
    h = hashlib.sha256()
    paths = [path] if not path.is_dir() or path.is_symlink() else [path, *sorted(path.rglob("*"))]
    for p in paths:
        st = p.lstat()
        h.update(f"{p.relative_to(path.parent)}|{st.st_mode:o}|".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() and not p.is_symlink() else "")
            for p in root.rglob("*")}


def new_entries(before: set[str], after: set[str]) -> str:
    """What appeared (the top-most new entries, folders with their file count) and what vanished."""
    added = sorted(after - before)
    tops = [a for a in added if not any(a != b and b.endswith("/") and a.startswith(b) for b in added)]
    parts = []
    for top in tops:
        n = sum(1 for a in added if a.startswith(top) and not a.endswith("/")) if top.endswith("/") else 0
        parts.append(f"+{top}" + (f" ({n} files)" if top.endswith("/") else ""))
    gone = sorted(before - after)
    parts += [f"-{g}" for g in gone if not any(g != b and b.endswith("/") and g.startswith(b) for b in gone)]
    return ", ".join(parts) or "nothing new"


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    result: Result
    disk: str
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        lines = _lines(self.result.stderr)
        if self.result.code == 0:
            lines = [ln for ln in self.result.stdout.splitlines() if ln.strip()][-1:] + \
                [ln for ln in lines if "left unquantized" in ln or "not valid UTF-8" in ln]
        return " / ".join(lines) or "(none)"


def _lines(text: str) -> list[str]:
    """Non-empty lines of ``text``, without progress-bar redraws."""
    return [ln.split("\r")[-1] for ln in text.splitlines() if ln.split("\r")[-1].strip()
            and not ln.split("\r")[-1].lstrip().startswith(("quantize ", "Loading weights"))]


def run_case(c: Case, root: Path, in_process: bool = False) -> Outcome:
    argv = c.setup(root)
    inputs_before = {p: digest(root / p) for p in c.inputs if (root / p).exists() or (root / p).is_symlink()}
    before = listing(root)
    try:
        if c.run is not None:
            result = c.run(root, argv)
        else:
            result = (run_in_process if in_process else run_subprocess)(root, argv)
        outcome = Outcome(c, argv, result, new_entries(before, listing(root)))
        for p, old in inputs_before.items():
            outcome.inputs[p] = (old, digest(root / p) if (root / p).exists() or (root / p).is_symlink() else "gone")
    finally:
        if c.cleanup is not None:
            c.cleanup(root)
    outcome.problems = _problems(c, root, outcome)
    return outcome


def _problems(c: Case, root: Path, o: Outcome) -> list[str]:
    r, found = o.result, []
    if r.code != c.code:
        found.append(f"exit {r.code}, expected {c.code}")
    text = r.stdout + r.stderr
    if "Traceback" in text:
        found.append("traceback")
    lines = _lines(r.stderr)
    if c.code == 2 and len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    found += [f"message lacks {m!r}" for m in (c.message, *c.also) if m and m not in r.stderr]
    found += [f"output shows {s!r}" for s in c.forbid if s in text]
    found += [f"input {p} changed" for p, (a, b) in o.inputs.items() if a != b]
    found += [f"{p} exists" for p in c.absent if (root / p).exists()]
    found += [f"{p} missing" for p in c.present if not (root / p).exists()]
    if c.code != 0 and not c.resumable:
        found += [f"left {p.name}" for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")) or
                  p.name.endswith(".llmq-lock")]
    if c.check is not None and not found:
        complaint = c.check(root, r)
        if complaint:
            found.append(complaint)
    return found


def table(outcomes: list[Outcome]) -> str:
    rows = ["| # | case | command | exit | message | on disk afterwards | inputs (sha256, before → after) | ok |",
            "|---|---|---|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        cmd = "llmq " + " ".join(o.argv) + (f" ({o.case.note})" if o.case.note else "")
        ins = "; ".join(f"{p} {a}" + (" unchanged" if a == b else f" → {b} CHANGED") for p, (a, b) in o.inputs.items())
        ok = "yes" if not o.problems else "NO: " + "; ".join(o.problems)
        cells = [str(i), o.case.name, f"`{cmd}`", str(o.result.code), o.message, o.disk, ins, ok]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--in-process", action="store_true",
                        help="run the plain cases through llmq.cli.main in this process (faster; the others "
                             "still run as commands)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only in c.name]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="llmq-hostile-") as scratch:
        for c in cases:
            root = Path(scratch) / c.name
            root.mkdir()
            try:
                outcomes.append(run_case(c, root, args.in_process))
            except Exception as e:  # noqa: BLE001 (a case that cannot even be set up is reported, not fatal)
                outcomes.append(Outcome(c, [], Result(-1, "", ""), "", problems=[f"could not run: {e!r}"]))
            print(f"{c.name}: exit {outcomes[-1].result.code}, "
                  f"{'ok' if not outcomes[-1].problems else outcomes[-1].problems}", file=sys.stderr, flush=True)
    for path in _CACHE.values():
        shutil.rmtree(path.parent, ignore_errors=True)
    print(table(outcomes))
    bad = [o.case.name for o in outcomes if o.problems]
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} cases as expected" + (f"; not: {', '.join(bad)}" if bad
                                                                                       else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
