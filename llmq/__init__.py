"""llmq: weight-only quantization of Hugging Face transformers (RTN, GPTQ) into GPTQ-format checkpoints."""

__version__ = "0.1.0"

from llmq.config import QuantConfig  # noqa: E402
from llmq.qlinear import QuantLinear  # noqa: E402

__all__ = ["QuantConfig", "QuantLinear", "__version__"]
