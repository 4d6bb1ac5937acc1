"""The library the recipes share. Its subpackages are layers, each importing only the ones below it
(tests/test_layers.py checks it):

    launch        the command line that runs a recipe; a launched recipe's start-up; calibration;
                  `recipes generate`
    doctor        consistency checks of accelerate, DeepSpeed and recipe configs
    train         a run around its loop; the loop; non-finite steps, signals, usage, probes
    output        run directory, checkpoints and their integrity, records, trackers, plots, final model
    distributed   Accelerator, prepare, the DeepSpeed and FSDP contracts, FSDP2, pipeline engine, ranks
    evaluation    evaluate metrics
    losses        causal-LM, DPO and GRPO losses, reward functions, reference log-probabilities,
                  accumulation
    model         from_pretrained, quantisation, LoRA, optimizers, sampling, default models
    data          datasets, formats, chat, plain text, preferences, labels
    plan          step/batch/schedule arithmetic (GRPO's too) and estimates (pure)
    config, errors, exit_status   typed configs; how a run stops on bad input; exit statuses
"""
