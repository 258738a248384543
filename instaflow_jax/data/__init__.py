"""Data: the embedded captioned-shapes dataset, a word tokenizer for it, and the input pipeline."""
