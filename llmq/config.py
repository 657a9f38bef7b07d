"""``QuantConfig``: what to quantize and how, and its round trip to ``quantization_config`` JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmq.packing import check_bits

METHODS = ("rtn", "gptq")


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
    mse: bool = False
    block_size: int = 128
    skip_unpackable: bool = False
    skip_nonfinite: bool = False  # leave layers whose weights no grid holds (NaN, inf, huge) unquantized
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        self.group_size = check_group_size(self.group_size)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")
        if self.desc_act is None:
            self.desc_act = self.method == "gptq"
        if self.desc_act and self.method != "gptq":
            raise ValueError("act-order (desc_act) needs --method gptq")

    def to_dict(self) -> dict[str, Any]:
        """``quantization_config`` as transformers, GPTQModel and vLLM read it."""
        from llmq import __version__

        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "meta": {
                "quantizer": [f"llmq:{__version__}"],
                "method": self.method,
                "mse": self.mse,
                **self.meta,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Read a ``quantization_config``; raises ``ValueError`` for formats llmq does not load."""
        if d.get("quant_method", "gptq") != "gptq":
            raise ValueError(f"unsupported quant_method {d.get('quant_method')!r}: llmq loads GPTQ checkpoints")
        fmt = d.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise ValueError(f"unsupported checkpoint_format {fmt!r}: llmq loads GPTQ v1 ('gptq') checkpoints")
        if not isinstance(d.get("meta") or {}, dict):
            raise ValueError(f"quantization_config meta must be a JSON object, got {d['meta']!r}")
        meta = dict(d.get("meta") or {})
        known = {f.name for f in fields(cls)} - {"meta", "method", "mse"}
        kwargs = {k: d[k] for k in known if k in d}
        method = meta.get("method", "gptq")
        return cls(method=method if method in METHODS else "gptq", mse=bool(meta.get("mse", False)),
                   meta={k: v for k, v in meta.items() if k not in ("method", "mse", "quantizer")}, **kwargs)

    def describe(self) -> str:
        """Short label such as ``gptq int4 g128 sym act-order``."""
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        parts = [self.method, f"int{self.bits}", g, "sym" if self.sym else "asym"]
        if self.desc_act:
            parts.append("act-order")
        if self.mse:
            parts.append("mse")
        return " ".join(parts)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` applied (and validated)."""
        return QuantConfig(**{**asdict(self), **changes})
