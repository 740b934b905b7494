"""Device mesh (data, fsdp, tensor) and the placement of parameters, LoRA adapters and batches on it.

Every parameter dimension has a logical name (`PARAM_AXES`, the one table); a rule set maps logical names to
mesh axes. One mesh serves every stage; the rule sets say how each stage lays weights on it:

- `TRAIN_RULES`: weights sharded over `fsdp` along the embedding dimension (ZeRO-3 style: XLA gathers them
  layer by layer where they are used) and over `tensor` along heads / MLP / vocabulary.
- `SAMPLE_RULES`: weights replicated over `fsdp` (no all-gather per decoded token) and tensor-parallel only;
  the fsdp axis then serves as more data parallelism for the prompts and the KV cache. `for_sampling`
  reshards a training layout to it before generation (a copy, dropped after sampling).
- `REPLICATED_RULES`: weights replicated, pure data parallelism (PPO's frozen base when it fits a device).

Under every rule set the batch is split over (data, fsdp) (`BATCH_AXES`). Activations are pinned there too:
inside `jax.set_mesh(mesh)` the model calls `constrain_batch` on the residual stream of every layer and on
the KV cache (true FSDP: without it the embedding output inherits the weights' hidden-dimension sharding
and XLA gathers the whole batch onto every device). Outside a mesh context it is a no-op.
A dimension whose size the mesh axis does not divide stays replicated (e.g. 3 kv heads on tensor=2).
Multi-host: `initialize_distributed` calls `jax.distributed.initialize` when the config asks for it or the
usual coordinator environment variables are set; each host then loads the same checkpoint and feeds its own
share of every batch (`shard_batch`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax.config import Section

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axes of every parameter (model.py layout; layers are stacked on the leading axis).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "layers.attn_norm": ("layers", "norm"),
    "layers.q": ("layers", "embed", "heads"),
    "layers.k": ("layers", "embed", "kv_heads"),
    "layers.v": ("layers", "embed", "kv_heads"),
    "layers.o": ("layers", "heads", "embed"),
    "layers.mlp_norm": ("layers", "norm"),
    "layers.gate": ("layers", "embed", "mlp"),
    "layers.up": ("layers", "embed", "mlp"),
    "layers.down": ("layers", "mlp", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
}

Rules = Mapping[str, str | tuple[str, ...] | None]
TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"), "seq": None,
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "layers": None, "norm": None, "lora_rank": None,
}
SAMPLE_RULES: Rules = {**TRAIN_RULES, "embed": None}
REPLICATED_RULES: Rules = {**SAMPLE_RULES, "vocab": None, "heads": None, "kv_heads": None, "mlp": None}
RULES: dict[str, Rules] = {"fsdp": TRAIN_RULES, "sample": SAMPLE_RULES, "replicated": REPLICATED_RULES}


@dataclass(frozen=True)
class MeshConfig(Section):
    """Mesh axis sizes (-1: all remaining devices; at most one axis) and multi-host start-up."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    multi_host: bool = False  # call jax.distributed.initialize (also done when JAX_COORDINATOR_ADDRESS is set)
    coordinator_address: str | None = None  # None: from the environment / cluster auto-detection
    num_processes: int | None = None
    process_id: int | None = None
    # A process whose peer died (kill -9, a lost host) stops with JAX's "distributed service detected fatal
    # errors" after this many seconds without the peer's heartbeat, instead of waiting in a collective.
    heartbeat_timeout_s: int = 100

    def check(self) -> None:
        sizes = self.sizes
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"data/fsdp/tensor must be positive or -1 (at most one), got {sizes}")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"heartbeat_timeout_s must be >= 1, got {self.heartbeat_timeout_s}")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def initialize_distributed(cfg: MeshConfig) -> None:
    """Join a multi-host run (once per process) if the config or the environment asks for it."""
    if not (cfg.multi_host or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the axis sizes multiply to the device count."""
    known = math.prod(s for s in cfg.sizes if s != -1)
    if -1 in cfg.sizes:
        if n_devices % known:
            raise ValueError(f"MeshConfig {cfg.sizes}: {n_devices} devices are not divisible by {known}")
        return tuple(n_devices // known if s == -1 else s for s in cfg.sizes)
    if known != n_devices:
        raise ValueError(f"MeshConfig {cfg.sizes} needs {known} devices, {n_devices} are available")
    return cfg.sizes


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_axes(path: tuple[Any, ...], ndim: int) -> tuple[str, ...]:
    """Logical axes of a parameter or LoRA leaf, from its path in the pytree.

    A LoRA factor `<param>.a` is [..., in, rank] and `<param>.b` is [..., rank, out] of the base `<param>`.
    """
    keys = [str(getattr(k, "key", k)) for k in path]
    lora_factor = keys[-1] if keys[-1] in ("a", "b") else None
    name = ".".join(keys[:-1] if lora_factor else keys)
    if name not in PARAM_AXES:
        raise ValueError(f"no logical axes for parameter {name!r}")
    axes = PARAM_AXES[name]
    if lora_factor == "a":
        axes = (*axes[:-1], "lora_rank")
    elif lora_factor == "b":
        axes = (*axes[:-2], "lora_rank", axes[-1])
    if len(axes) != ndim:
        raise ValueError(f"parameter {'.'.join(keys)} has {ndim} dims, its logical axes are {axes}")
    return axes


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """Mesh axes for each dimension; dimensions the mesh axes do not divide stay replicated."""
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axes = rules.get(axis)
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            names = tuple(n for n in names if n in mesh.shape)  # a smaller mesh (PPO's 1-D one) lacks some
            mesh_axes = (names[0] if len(names) == 1 else names) if names else None
            if mesh_axes is not None and size % math.prod(mesh.shape[n] for n in names):
                mesh_axes = None
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    """NamedShardings for a parameter or LoRA pytree (arrays or anything with `.shape`)."""
    def leaf(path, x):
        shape = tuple(x.shape)
        return NamedSharding(mesh, partition_spec(logical_axes(path, len(shape)), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def shard_params(tree: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    """Place a parameter or LoRA pytree (host or device arrays, the same on every host) on the mesh."""
    return jax.device_put(tree, param_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Leading (batch) dimension over the batch mesh axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh_batch_axes(mesh, rules), *([None] * (ndim - 1))))


def mesh_batch_axes(mesh: Any, rules: Rules = TRAIN_RULES) -> tuple[str, ...]:
    """The batch axes that `mesh` (concrete or abstract) has; a 1-D ("data",) mesh has just "data"."""
    return tuple(a for a in rules["batch"] if a in mesh.axis_names)


def batch_shards(mesh: Any) -> int:
    """Into how many pieces the batch is split on `mesh` (1 for None or an empty mesh)."""
    if mesh is None or mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in mesh_batch_axes(mesh))


def constrain_batch(x: jax.Array, dim: int = 0) -> jax.Array:
    """Pin dimension `dim` of an activation to the batch axes of the current mesh (`jax.set_mesh`), the rest
    replicated; a no-op without a mesh or when the batch does not divide evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = batch_shards(mesh)
    if shards == 1 or x.shape[dim] % shards:
        return x
    spec = [None] * x.ndim
    spec[dim] = mesh_batch_axes(mesh)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a pytree's arrays are placed on (from its first leaf), or None (one device, host arrays)."""
    leaves = jax.tree.leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def for_sampling(tree: Any) -> Any:
    """A copy of a placed parameter or LoRA pytree in the sampling layout (`SAMPLE_RULES`) of its mesh; the
    tree itself when it is not on a multi-device mesh."""
    mesh = mesh_of(tree)
    return tree if mesh is None else shard_params(tree, mesh, SAMPLE_RULES)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    """Global arrays from each host's share of a batch pytree ([B_local, ...] per host; B_local * hosts = B)."""
    def leaf(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

    return jax.tree.map(leaf, batch)
