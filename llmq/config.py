"""``QuantConfig``: what to quantize and how, and its round trip to ``quantization_config`` JSON.

Per-module settings use GPTQModel's ``dynamic`` map (also read by vLLM): ordered rules from a
regular expression, matched with ``re.match`` against a module's full name, to the settings that
replace the base ones (``bits``, ``group_size``); the first rule that matches wins, and a key
prefixed ``-:`` leaves the modules it matches unquantized (``+:`` or no prefix: override).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from llmq.packing import CHECKPOINT_FORMATS, check_bits, check_format

METHODS = ("rtn", "gptq")
# How a group size that does not divide a layer's input is handled (see ``fit_groups``).
GROUP_FITS = ("shrink", "per-module", "partial")
# Group sizes other loaders take: GPTQModel's kernels list powers of two from 16 up.
MIN_FIT_GROUP = 16
OVERRIDE_KEYS = ("bits", "group_size")


def check_group_size(group_size: Any) -> int:
    """Return ``group_size`` as an int, or raise a one-line ``ValueError``: -1 or a positive whole number."""
    if isinstance(group_size, bool):
        raise ValueError(f"group size must be -1 or a positive whole number, got {group_size!r}")
    if isinstance(group_size, float) and group_size.is_integer():
        group_size = int(group_size)
    if isinstance(group_size, str):
        try:
            group_size = int(group_size.strip())
        except ValueError:
            raise ValueError(f"group size must be -1 or a positive whole number, got {group_size!r}") from None
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise ValueError(f"group size must be -1 or a positive whole number, got {group_size!r}")
    return group_size


class ModuleSpec(NamedTuple):
    """Width and group size of one quantized module."""

    bits: int
    group_size: int

    def __str__(self) -> str:
        return f"int{self.bits} " + ("per-channel" if self.group_size == -1 else f"g{self.group_size}")


def default_format(sym: bool) -> str:
    """The checkpoint format llmq writes: ``gptq`` (v1) for symmetric grids, whose zero point
    ``2**(bits-1)`` every loader reads alike, ``gptq_v2`` for asymmetric ones (v1 cannot hold a
    zero point of 0)."""
    return "gptq" if sym else "gptq_v2"


def dynamic_override(dynamic: dict[str, dict[str, Any]], module: str) -> dict[str, Any] | bool | None:
    """The ``dynamic`` settings of ``module`` (full name): the first rule whose pattern matches
    (``re.match``, as GPTQModel and vLLM do), ``False`` for a ``-:`` rule, ``None`` when none does."""
    for key, settings in dynamic.items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        if re.match(pattern, module):
            return False if negative else settings
    return None


def dynamic_rules(settings: dict[str, dict[str, Any]], modules: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``dynamic`` rules giving each module named in ``settings`` its overrides, in the order of
    ``modules`` (every quantized module, overridden or not). A rule is anchored (``^...$``); the
    numbers in a name (block indices) become ``\\d+`` where every module that pattern covers
    has the same overrides, so a model-wide change is one rule per module kind."""
    def general(name: str) -> str:
        return re.sub(r"(?<=\\\.)\d+(?=\\\.)", r"\\d+", re.escape(name))

    modules = list(modules)
    seen: dict[str, set[str]] = {}
    for name in modules:
        seen.setdefault(general(name), set()).add(json.dumps(settings.get(name), sort_keys=True))
    rules: dict[str, dict[str, Any]] = {}
    for name in modules:
        if name not in settings:
            continue
        pattern = general(name) if len(seen[general(name)]) == 1 else re.escape(name)
        rules.setdefault(f"+:^{pattern}$", dict(settings[name]))
    return rules


# AutoRound's exports whose tensors are GPTQ's (``quant_method: auto-round``), by packing format.
AUTO_ROUND_PACKINGS = {"auto_round:auto_gptq": "gptq"}


def _from_auto_round(d: dict[str, Any]) -> dict[str, Any]:
    """An AutoRound ``quantization_config`` whose tensors are GPTQ-packed, as the GPTQ config it
    amounts to: its per-layer ``extra_config`` (16 bits or more: left unquantized) becomes
    ``dynamic`` rules. Raises ``ValueError`` for its other packings and data types."""
    packing = d.get("packing_format", "auto_round:auto_gptq")
    if packing not in AUTO_ROUND_PACKINGS:
        raise ValueError(f"unsupported AutoRound packing_format {packing!r}: llmq loads "
                         f"{' and '.join(AUTO_ROUND_PACKINGS)}")
    if d.get("data_type", "int") != "int":
        raise ValueError(f"unsupported AutoRound data_type {d['data_type']!r}: llmq loads integer weights")
    bits, group_size = d.get("bits", 4), d.get("group_size", 128)
    dynamic: dict[str, dict[str, Any]] = {}
    for name, layer in (d.get("extra_config") or {}).items():
        if not isinstance(layer, dict):
            raise ValueError(f"AutoRound extra_config for {name!r} must be a JSON object, got {layer!r}")
        if (layer.get("bits") or bits) >= 16:
            dynamic[f"-:^{re.escape(name)}$"] = {}
            continue
        if layer.get("data_type", d.get("data_type", "int")) != "int":  # a layer's sym: its stored zeros say it
            raise ValueError(f"unsupported AutoRound layer {name!r}: llmq loads integer weights, got {layer}")
        dynamic[f"+:^{re.escape(name)}$"] = {"bits": layer.get("bits") or bits,
                                             "group_size": layer.get("group_size") or group_size}
    blocks = d.get("block_name_to_quantize")
    return {**{k: v for k, v in d.items() if k not in ("extra_config", "packing_format")},
            "quant_method": "gptq", "checkpoint_format": AUTO_ROUND_PACKINGS[packing],
            "dynamic": {**dynamic, **(d.get("dynamic") or {})},
            "block_name_to_quantize": ",".join(blocks) if isinstance(blocks, list) else blocks}


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def fit_groups(in_features: dict[str, int], group_size: int, fit: str) -> tuple[int, dict[str, int], str | None]:
    """Group sizes for modules with inputs ``in_features`` (full name -> inputs) when
    ``group_size`` does not divide some of them: ``(base group size, per-module group sizes,
    a sentence saying what changed or None)``.

    A group size no smaller than every input is per-channel (-1). ``shrink``: one group size for
    every module, the largest power of two up to ``group_size`` (and at least ``MIN_FIT_GROUP``)
    dividing all inputs; ``per-module``: such a size for each misfit alone (written as ``dynamic``
    rules); ``partial``: keep ``group_size`` with a shorter last group, which GPTQModel's and
    transformers' CPU int4 kernel and vLLM refuse.
    """
    if fit not in GROUP_FITS:
        raise ValueError(f"group fit must be one of {GROUP_FITS}, got {fit!r}")
    if group_size >= max(in_features.values()):  # one group per row everywhere: per-channel, as GPTQ writes it
        return -1, {}, None
    misfits = {n: k for n, k in in_features.items() if group_size != -1 and k % group_size}
    if not misfits or fit == "partial":
        return group_size, {}, None
    first, k = next(iter(misfits.items()))
    why = (f"{len(misfits)} of {len(in_features)} quantized layers have inputs that are not a multiple of "
           f"{group_size} (e.g. {first}: {k})")

    def largest(inputs: Iterable[int]) -> int:
        inputs = list(inputs)
        g = _pow2_floor(group_size)
        while g >= MIN_FIT_GROUP and any(i % g for i in inputs):
            g //= 2
        if g < MIN_FIT_GROUP:
            raise ValueError(f"{why}, and no power of two from {MIN_FIT_GROUP} to {group_size} divides them: "
                             "use --group-size -1 or --group-fit partial")
        return g

    if fit == "shrink":
        g = largest(in_features.values())
        return g, {}, f"group size {group_size} -> {g}: {why}"
    sizes = {n: largest([k]) for n, k in misfits.items()}
    return group_size, sizes, (f"group size {group_size} kept where it divides the input, "
                               f"{'/'.join(map(str, sorted(set(sizes.values()))))} elsewhere: {why}")


@dataclass
class QuantConfig:
    """Settings of one quantization run (the fields of GPTQ's ``quantization_config``)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "rtn"
    desc_act: bool | None = None  # None: on for GPTQ (without it GPTQ int4 g128 lost to RTN on SmolLM2), off for RTN
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    # Range search per group: False (min/max), True ("plain") or "weighted" (each column's error weighted as
    # GPTQ's loss weighs it; RTN: plain). None: "weighted" for GPTQ, off for RTN.
    mse: bool | str | None = None
    block_size: int = 128
    skip_unpackable: bool = False
    checkpoint_format: str | None = None  # None: default_format(sym)
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-module overrides, see dynamic_override
    lm_head: bool = False  # the output head is quantized too
    # optimum's key (transformers' loader): "" makes it build every linear of the model quantized, which
    # a quantized head needs there (by default it quantizes the blocks only); None leaves it out
    block_name_to_quantize: str | None = None
    head_bits: int | None = None  # quantize: the output head at this width (RTN), None to keep it unquantized
    group_fit: str = "shrink"  # quantize: see fit_groups
    skip_nonfinite: bool = False  # leave layers whose weights no grid holds (NaN, inf, huge) unquantized
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        self.group_size = check_group_size(self.group_size)
        if self.checkpoint_format is None:
            self.checkpoint_format = default_format(self.sym)
        check_format(self.checkpoint_format)
        if self.head_bits is not None:
            check_bits(self.head_bits)
        if self.group_fit not in GROUP_FITS:
            raise ValueError(f"group fit must be one of {GROUP_FITS}, got {self.group_fit!r}")
        for key, settings in self.dynamic.items():
            _check_rule(key, settings)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")
        if self.mse is None:
            self.mse = "weighted" if self.method == "gptq" else False
        elif self.mse in ("plain", "off"):
            self.mse = self.mse == "plain"
        if self.mse not in (False, True, "weighted"):
            raise ValueError(f"mse must be 'weighted', 'plain' or 'off', got {self.mse!r}")
        if self.desc_act is None:
            self.desc_act = self.method == "gptq"
        if self.desc_act and self.method != "gptq":
            raise ValueError("act-order (desc_act) needs --method gptq")

    def to_dict(self) -> dict[str, Any]:
        """``quantization_config`` as transformers, GPTQModel and vLLM read it."""
        from llmq import __version__

        d = {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            # vLLM reads checkpoint_format, GPTQModel and transformers format (or checkpoint_format)
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,
            "pack_dtype": "int32",
            "lm_head": self.lm_head,
            "meta": {
                "quantizer": [f"llmq:{__version__}"],
                "method": self.method,
                "mse": self.mse,
                **self.meta,
            },
        }
        if self.dynamic:
            d["dynamic"] = self.dynamic
        if self.block_name_to_quantize is not None:
            d["block_name_to_quantize"] = self.block_name_to_quantize
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Read a ``quantization_config``; raises ``ValueError`` for formats llmq does not load."""
        if d.get("quant_method") == "auto-round":
            d = _from_auto_round(d)
        if d.get("quant_method", "gptq") != "gptq":
            raise ValueError(f"unsupported quant_method {d.get('quant_method')!r}: llmq loads GPTQ checkpoints")
        if not isinstance(d.get("meta") or {}, dict):
            raise ValueError(f"quantization_config meta must be a JSON object, got {d['meta']!r}")
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"unsupported checkpoint_format {fmt!r}: llmq loads {' and '.join(CHECKPOINT_FORMATS)}")
        if d.get("pack_dtype", "int32") != "int32":
            raise ValueError(f"unsupported pack_dtype {d['pack_dtype']!r}: llmq loads int32-packed checkpoints")
        meta = dict(d.get("meta") or {})
        known = {f.name for f in fields(cls)} - {"meta", "method", "mse", "checkpoint_format", "head_bits",
                                                  "group_fit", "skip_nonfinite"}
        kwargs = {k: d[k] for k in known if d.get(k) is not None}
        method = meta.get("method", "gptq")
        mse = meta.get("mse", False)
        return cls(method=method if method in METHODS else "gptq", mse=mse if mse == "weighted" else bool(mse),
                   checkpoint_format=fmt,
                   meta={k: v for k, v in meta.items() if k not in ("method", "mse", "quantizer")}, **kwargs)

    def for_module(self, name: str) -> ModuleSpec | None:
        """Width and group size of module ``name`` (full name) after the ``dynamic`` overrides;
        None when a ``-:`` rule leaves it unquantized."""
        settings = dynamic_override(self.dynamic, name)
        if settings is False:
            return None
        settings = settings or {}
        return ModuleSpec(settings.get("bits", self.bits), settings.get("group_size", self.group_size))

    def describe(self) -> str:
        """Short label such as ``gptq int4 g128 sym act-order``."""
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        parts = [self.method, f"int{self.bits}", g, "sym" if self.sym else "asym"]
        if self.desc_act:
            parts.append("act-order")
        if self.mse:
            parts.append("weighted mse" if self.mse == "weighted" else "mse")
        if self.lm_head:
            parts.append("quantized head")
        if self.dynamic:
            parts.append(f"{len(self.dynamic)} per-module rules")
        if self.meta.get("bits_budget") is not None:
            parts.append(f"budget {self.meta['bits_budget']} bits/weight")
        if self.meta.get("awq"):
            parts.append("awq")
        if self.meta.get("tune"):
            parts.append("learned rounding")
        return " ".join(parts)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` applied (and validated); a new ``sym`` brings its own default format."""
        if "sym" in changes and "checkpoint_format" not in changes:
            changes["checkpoint_format"] = None
        return QuantConfig(**{**asdict(self), **changes})


def _check_rule(key: str, settings: Any) -> None:
    """Raise a one-line ``ValueError`` for a ``dynamic`` rule llmq cannot apply."""
    pattern = key[2:] if key.startswith(("-:", "+:")) else key
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"dynamic rule {key!r} is not a regular expression: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"dynamic rule {key!r} must map to an object of settings, got {settings!r}")
    if "bits" in settings:
        check_bits(settings["bits"])
    if "group_size" in settings:
        check_group_size(settings["group_size"])
