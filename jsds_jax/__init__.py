"""jsds-jax: joint sparse-dense text-image retrieval on frozen dual encoders, in JAX/Flax."""

__version__ = "0.1.0"
