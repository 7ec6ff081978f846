"""The one DeepSpeed training loop every training stage uses (neg, nat, distill, ranker)."""
