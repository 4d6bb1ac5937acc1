"""Generators of the bundled datasets: each rewrites its folder of recipes/data/ byte for byte."""
