"""What a step minimises: the causal-LM loss through the head in chunks, the DPO family, the reference
model's log-probabilities, and token-normalised accumulation."""
