"""Weight quantization as a module swap: models never import this package."""

from slimserve.quant.int8 import quantize_model

__all__ = ["quantize_model"]
