"""What kvd reads from and adds to a transformers model: RoPE, K/V capture, the student's
logit head and per-token NLL. Above `kvd.core` only."""
