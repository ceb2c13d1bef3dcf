"""Model files in, (config, named weights, tokenizer) out. Never imports the engine."""

from slimserve.loader.resolve import ModelSource, default_model_path, open_model

__all__ = ["ModelSource", "default_model_path", "open_model"]
