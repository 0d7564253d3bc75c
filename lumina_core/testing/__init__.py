"""Test and benchmark helpers: tiny official-format checkpoints, tiny tokenizers and verifiers, the
image-token grammar parser. Not imported by the runtime (the demo rebuild uses the tokenizer builder)."""
