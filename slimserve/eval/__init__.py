"""Quality measurements: perplexity of a text, so every quantization mode's cost is a number."""
