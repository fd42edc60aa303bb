"""`kvd check-shapes`: the teacher -> student plan, its memory per GPU, and geometry probes."""
