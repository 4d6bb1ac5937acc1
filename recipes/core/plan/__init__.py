"""The run's arithmetic before it runs: steps, batches and schedule, pipeline layout, FLOPs, memory and time
estimates, the accelerator table. Pure: no torch, accelerate or deepspeed import."""
