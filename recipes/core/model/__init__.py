"""The model a run trains: from_pretrained with its kernels and checkpointing, LoRA adapters, the optimizer,
the model and tokenizer a config names, and the default models."""
