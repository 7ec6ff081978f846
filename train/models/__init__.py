"""Model loading, LoRA adapters on disk (PEFT format), and the NAT layer."""
