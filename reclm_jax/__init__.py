"""reclm-jax: controllable LLM recommenders (RecLM-gen) in JAX/Flax."""

__version__ = "0.1.0"
