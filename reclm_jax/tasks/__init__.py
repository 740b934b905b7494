"""Instruction data: SL tasks I0-I4, RL prompts, the fixed valid/test sets and the SL input pipeline."""
