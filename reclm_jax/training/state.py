"""The train state every stage checkpoints: one typed pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps done
    params: Any  # the trainable parameters (an adapter, adapters and a value head, a whole small model)
    opt_state: Any  # the optax state of `params`

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)
