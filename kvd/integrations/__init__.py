"""kvd's parts inside other training loops (kvd.integrations.hf: transformers.Trainer)."""
