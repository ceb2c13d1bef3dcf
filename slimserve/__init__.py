"""slimserve: LLM inference and serving that gets the most out of scarce hardware."""

from slimserve.errors import (
    CapacityError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
    SlimserveError,
    UnsupportedModel,
)
from slimserve.llm import LLM
from slimserve.outputs import CompletionOutput, RequestOutput
from slimserve.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "SlimserveError",
    "InvalidRequest",
    "ContextLengthExceeded",
    "ModelLoadError",
    "UnsupportedModel",
    "CapacityError",
]
__version__ = "0.1.0"
