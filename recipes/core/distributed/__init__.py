"""The processes of a run: the Accelerator, FSDP2, the DeepSpeed config contract, the pipeline engine, the
weights reader that builds one stage, and sums and agreements over ranks."""
