"""Training: Megatron-style configuration, optimizer and schedule, the step, the loop, checkpoints, logs, the CLI."""
