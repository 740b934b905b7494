"""The one training loop every stage runs in, with its checkpoints and logs."""
