"""Per-device work of a compiled XLA program, read from its optimised HLO text, with loops counted in full.

    stats = hlo_stats.analyse(compiled.as_text(), unknown_trips=256)
    stats.flops            # matrix-product FLOPs (dot ops: 2 x output elements x contracted size), per device
    stats.collective_bytes # bytes produced by all-gather / all-reduce / reduce-scatter / all-to-all / permute
    stats.bf16_f32_copies  # bytes of float32 copies of bfloat16 program arguments (see below)
    stats.unknown_loops    # while loops without a known trip count (counted `unknown_trips` times each)

`compiled.cost_analysis()` counts the body of a loop once: a 32-layer `lax.scan` inside a 4-step accumulation
scan is understated 128 times. Here every `while` body is multiplied by its trip count (XLA's
`known_trip_count`, which scans and fixed-bound loops carry; a data-dependent loop such as the sampler's
decode takes `unknown_trips`, an upper bound), a `conditional` counts its most expensive branch, and fusions
and calls count what they contain. The text is the partitioned per-device program, so shapes and FLOPs are
one device's.

Only dot products are counted (elementwise work is a few percent of a transformer's FLOPs, and MFU is defined
on matrix-product FLOPs). `bf16_f32_copies`: XLA's CPU backend converts bfloat16 arguments that feed dot
products into float32 copies (its matrix kernels are float32); GPUs and TPUs multiply bfloat16 directly, so
these copies are CPU-only memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")


@dataclass
class Instr:
    name: str
    shape: str  # e.g. "bf16[3,16,64]{2,1,0}" or a tuple "(s32[], f32[2,64]{1,0})"
    opcode: str
    operands: list[str]
    attrs: str


@dataclass
class Stats:
    flops: float = 0.0
    collective_bytes: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)  # bytes by "<opcode> <dtype>"
    bf16_f32_copies: float = 0.0
    unknown_loops: int = 0


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO shape string (one, or several for a tuple)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> int:
    return sum(_BYTES.get(t, 4) * math.prod(dims) for t, dims in arrays(shape))


def _split_shape(rest: str) -> tuple[str, str]:
    """'<shape> <opcode>(...' -> (shape, remainder); a tuple shape has spaces inside its parentheses."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 2:]
    shape, _, remainder = rest.partition(" ")
    return shape, remainder


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations of an HLO module (name -> instructions) and the name of the entry computation."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(2), [])
            if header.group(1):
                entry = header.group(2)
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line) if current is not None else None
        if not m:
            continue
        shape, rest = _split_shape(m.group(2))
        opcode, _, args = rest.partition("(")
        depth, end = 1, 0
        for end, c in enumerate(args):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                break
        operands = re.findall(r"%([\w.\-]+)", args[:end])
        current.append(Instr(m.group(1), shape, opcode.strip(), operands, args[end + 1:]))
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", attrs)
    if m:
        return re.findall(r"%([\w.\-]+)", m.group(1))
    m = re.search(key + r"=%([\w.\-]+)", attrs)
    return [m.group(1)] if m else []


def _dot_flops(instr: Instr, shapes: dict[str, str]) -> float:
    out = arrays(instr.shape)[0][1]
    lhs = arrays(shapes[instr.operands[0]])[0][1]
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
    return 2.0 * math.prod(out) * contracted


def analyse(text: str, unknown_trips: int = 1) -> Stats:
    """Per-device dot FLOPs and collective bytes of an optimised HLO module, loops multiplied out."""
    comps, entry = parse(text)
    stats = Stats()
    memo: dict[str, tuple[float, dict[str, float], int]] = {}

    def cost(name: str) -> tuple[float, dict[str, float], int]:
        if name in memo:
            return memo[name]
        flops, coll, unknown = 0.0, {}, 0
        instrs = comps.get(name, [])
        shapes = {i.name: i.shape for i in instrs}

        def add(sub: tuple[float, dict[str, float], int], times: float = 1.0):
            nonlocal flops, unknown
            flops += times * sub[0]
            for k, v in sub[1].items():
                coll[k] = coll.get(k, 0.0) + times * v
            unknown += sub[2]

        for instr in instrs:
            op = instr.opcode
            base = op.removesuffix("-start")
            if op == "dot":
                flops += _dot_flops(instr, shapes)
            elif base in _COLLECTIVES and not op.endswith("-done"):
                produced = arrays(instr.shape)
                size = _BYTES.get(produced[-1][0], 4) * math.prod(produced[-1][1]) if produced else 0
                key = f"{base} {produced[-1][0]}" if produced else base
                coll[key] = coll.get(key, 0.0) + size
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
                n = int(trips.group(1)) if trips else unknown_trips
                unknown += 0 if trips else 1
                for sub in _called(instr.attrs, "body") + _called(instr.attrs, "condition"):
                    add(cost(sub), n)
            elif op == "conditional":
                branches = (_called(instr.attrs, "branch_computations")
                            or _called(instr.attrs, "true_computation") + _called(instr.attrs, "false_computation"))
                if branches:
                    add(max((cost(b) for b in branches), key=lambda c: c[0]))
            else:
                for sub in _called(instr.attrs, "calls"):
                    add(cost(sub))
        memo[name] = (flops, coll, unknown)
        return memo[name]

    stats.flops, stats.collectives, stats.unknown_loops = cost(entry)
    stats.collective_bytes = sum(stats.collectives.values())
    stats.bf16_f32_copies = _bf16_copies(comps, entry)
    return stats


def _bf16_copies(comps: dict[str, list[Instr]], entry: str) -> float:
    """Bytes of float32 results in the entry computation that convert a whole bfloat16 argument."""
    instrs = comps.get(entry, [])
    params = {i.name: arrays(i.shape)[0] for i in instrs if i.opcode == "parameter" and arrays(i.shape)}
    total = 0.0
    for instr in instrs:
        out = arrays(instr.shape)
        if instr.opcode not in ("fusion", "convert") or len(out) != 1 or out[0][0] != "f32":
            continue
        for operand in instr.operands:
            if operand in params and params[operand][0] == "bf16" and params[operand][1] == out[0][1]:
                total += 4 * math.prod(out[0][1])
                break
    return total
