"""Consistency checks of an accelerate config, a DeepSpeed config, a recipe config and a hostfile.

Each rule is a small function over parsed dicts that yields (key, problem, fix); the rules of the
DeepSpeed and FSDP contracts live with the engines (core/distributed/deepspeed_contract.py,
fsdp_contract.py), the doctor's own here by the config they check:

    findings           Finding (file, key, problem, fix and the key's line), loading files into findings
    accelerate_config  an accelerate config on its own, and a DeepSpeed hostfile against it
    deepspeed          a DeepSpeed config on its own and against the recipe (the DeepSpeed contract)
    fsdp               the FSDP contract as findings, on the YAML and on the launch environment
    recipe             batch and schedule arithmetic, non-finite steps, precision on a named GPU
    diagnose           `recipes doctor` (diagnose) and the same checks at a recipe's start-up (preflight)
    known_keys         the valid keys, read from Accelerate's and DeepSpeed's own config classes
    topology           what the accelerate and DeepSpeed configs say about the run's topology
"""
