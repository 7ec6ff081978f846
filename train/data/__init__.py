"""Data: readers for the TDG and flat layouts, graders, prepare, synthetic data, tokenizer, batching."""
