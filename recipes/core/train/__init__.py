"""A run around its training loop: setup, the loop's bookkeeping, non-finite steps, stop signals, usage and
the probes that look inside a step."""
