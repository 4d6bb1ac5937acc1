"""The bundled datasets (folders of JSONL files) and, in generators/, the code that writes them."""
