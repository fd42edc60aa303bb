"""kvd: distil several heterogeneous teacher LLMs into one student through their KV caches."""

__version__ = "0.1.0"
