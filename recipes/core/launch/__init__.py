"""Launching recipes: the command line, how a launched recipe process starts, and calibrating a plan on real
steps."""
