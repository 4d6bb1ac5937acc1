"""The processes of a run: the Accelerator, the one `prepare` of every recipe, the DeepSpeed and FSDP
contracts (what their configs may say next to a recipe), FSDP2, the pipeline engine, the weights reader that
builds one stage, and sums and agreements over ranks."""
