"""The control intentions of the paper (section 2.1), shared by the rewards and the metrics.

| kind   | paper          | the user asks for                                        |
|--------|----------------|----------------------------------------------------------|
| "seq"  | I_0            | a plain top-k list (no control)                          |
| "+c"   | I_1^{+C}       | items of category C                                      |
| "-c"   | I_1^{-C}       | no item of category C                                    |
| "<="   | I_2^{CP<=m}    | at most a proportion m of the k items in C               |
| ">="   | I_2^{CP>=m}    | at least a proportion m of the k items in C              |
| "~"    | I_2^{CP~m}     | about a proportion m of the k items in C                 |

m is a fraction in [0, 1] (0.3 for "30 %"); it is 0 and unused for "seq", "+c" and "-c".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

ControlKind = Literal["seq", "+c", "-c", "<=", ">=", "~"]
KINDS: tuple[str, ...] = get_args(ControlKind)
PROPORTION_KINDS = ("<=", ">=", "~")
# Integer codes for vectorised batches: KIND_CODE[kind] == KINDS.index(kind).
KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}


@dataclass(frozen=True)
class Control:
    kind: ControlKind = "seq"
    m: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"control kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in PROPORTION_KINDS:
            if not 0.0 <= self.m <= 1.0:
                raise ValueError(f"control m={self.m} for kind {self.kind!r} must be a fraction in [0, 1]")
        elif self.m != 0.0:
            raise ValueError(f"control kind {self.kind!r} takes no proportion, got m={self.m}")

    @property
    def code(self) -> int:
        return KIND_CODE[self.kind]


def quota(k, m):
    """k * m, the number of in-category items a proportion instruction names (scalar or array).

    Rounded to 9 decimals so that 10 * 0.3 compares equal to 3 (in binary it is 3.0000000000000004, which
    would make "Count_in >= k * m" fail for Count_in = 3).
    """
    return np.round(np.multiply(k, m, dtype=np.float64), 9)
