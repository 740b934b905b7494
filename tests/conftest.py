import os

# Tests run on the CPU; don't let JAX probe for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
