import atexit
import os
import shutil
import tempfile

# Tests run on the CPU; don't let JAX probe for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same tiny programs again: in every test that builds the same model,
# and in every subprocess (kill-and-resume runs, 8-device meshes, pipeline stages). One persistent compilation cache
# for the whole session and its subprocesses compiles each program once. It starts empty in a fresh directory, so
# every run compiles everything at least once, and the cache key (the program, the compile options, the devices,
# XLA flags, jax/jaxlib versions) is JAX's: a hit returns the executable the same compilation would build.
# Set through the environment (read when jax is imported) so subprocesses share it; an outer setting is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="reclm-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# A size limit turns on JAX's file lock around every read and write, so parallel workers never see half an entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
