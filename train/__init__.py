"""tdg-trainer: distill reasoning from LLMs with negative data (NAT, NCE, ASC)."""

__version__ = "0.1.0"
