"""Foundations every other layer may use: errors, tensor bundles, atomic files, names, the
Config pattern, the plugin registries and manager, device and process group, progress output,
the allocator and the step's profiler phases. Imports nothing else of kvd."""
