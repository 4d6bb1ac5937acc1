"""The library the recipes share. Its subpackages are layers, each importing only the ones below it
(tests/test_layers.py checks it):

    launch        the command line that runs a recipe; a launched recipe's start-up; calibration
    doctor        consistency checks of accelerate, DeepSpeed and recipe configs
    train         a run around its loop; the loop; non-finite steps, signals, usage, probes
    output        run directory, checkpoints, records, trackers, plots, final model
    distributed   Accelerator, prepare, the DeepSpeed and FSDP contracts, FSDP2, pipeline engine, ranks
    evaluation    evaluate metrics
    losses        causal-LM and DPO losses, reference log-probabilities, accumulation
    model         from_pretrained, LoRA, optimizer, default models
    data          datasets, formats, chat, plain text, preferences, labels
    plan          step/batch/schedule arithmetic and estimates (pure)
    config, errors, exit_status   typed configs; how a run stops on bad input; exit statuses
"""
