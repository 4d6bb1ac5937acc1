"""Datasets as the recipes read them: loading any name, file or directory with errors that point at the
row, the SFT formats, chat rendering, plain text, preference pairs and classification labels."""
