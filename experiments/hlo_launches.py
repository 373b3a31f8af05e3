"""The kernels an optimized HLO module launches, read from its text (`compiled.as_text()`).

Each instruction of the entry computation that does work on the device (a fusion, a custom
call, a copy, a loop...) becomes one `Launch`; bookkeeping instructions (parameters,
constants, tuples, bitcasts) do not. A Pallas Triton call is named by its kernel's name, a
fusion by XLA's name with the numbering dropped (so an unrolled step's layers count under
one name, as in `device_trace.family`). Used by `offline_gpu_hlo.py` to list the kernels of
a step compiled for a GPU that is not here.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from device_trace import family

# Entry-computation instructions that launch nothing.
BOOKKEEPING = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "opt-barrier"}
)
# Ops that only move bytes: a fusion of nothing else is a copy (XLA makes a contiguous
# slice a memcpy; a scanned step's per-layer weight slices run as async dynamic slices).
MOVING_OPS = frozenset(
    {"copy", "copy-start", "slice", "dynamic-slice", "bitcast", "reshape", "transpose"}
)

_INSTRUCTION = re.compile(
    r"\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>.+?) (?P<op>[a-z][a-z0-9\-]*)\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8e\w+)\[(?P<dims>[\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str  # XLA's instruction name, or the Triton kernel's name for a Pallas call
    op: str  # fusion, custom-call, copy, while...
    kind: str  # a fusion's kind (kLoop, kInput, kCustom...), a custom call's target, or ""
    out_bytes: int  # bytes of the arrays it produces, less those aliased to its inputs
    grid: tuple[int, int, int] | None = None  # a Pallas Triton call's launch grid
    repeat: int = 1  # launches a step: a loop body's trip count
    moves_only: bool = False  # it computes nothing: a copy, or a fusion of slices

    @property
    def family(self) -> str:
        """The name without XLA's numbering and clone suffixes (`fused_dynamic_slice.4.clone`
        -> `fused_dynamic_slice`)."""
        return family(re.sub(r"(\.(clone|sunk))+$", "", self.name))


def array_bytes(shape: str, skip: frozenset[int] = frozenset()) -> int:
    """Bytes of the arrays in an HLO shape string, e.g. '(bf16[2,3]{1,0}, s32[])', but for
    the (flat) tuple elements in `skip`."""
    total = 0
    for i, m in enumerate(_ARRAY.finditer(shape)):
        if i in skip:
            continue
        dtype, dims = m.group("dtype"), m.group("dims")
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def aliased_outputs(line: str) -> frozenset[int]:
    """Output tuple indices a custom call writes in place of an input (the caches the
    attention kernel updates): `output_to_operand_aliasing={{1}: (3, {}), ...}`; {0} for a
    single aliased output."""
    m = re.search(r"output_to_operand_aliasing=\{(.*?)\}\s*[,}]", line)
    if m is None:
        return frozenset()
    return frozenset(int(i or 0) for i in re.findall(r"\{(\d*)\}:", m.group(0)))


def computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    """The module's computations as {name: instruction lines}, and the ENTRY one's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.split("\n"):
        head = re.match(r"(ENTRY )?%(\S+) \(.*\{$", line)
        if head:
            current = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    return entry, comps


def launches(hlo: str) -> list[Launch]:
    """The entry computation's device work, in the module's (scheduled) order; a while
    loop's body in its place, each launch repeated by the loop's known trip count."""
    entry, comps = computations(hlo)
    return _launches(comps[entry], comps, 1)


def _launches(lines: list[str], comps: dict[str, list[str]], repeat: int) -> list[Launch]:
    out = []
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m is None or m.group("op") in BOOKKEEPING or m.group("op").endswith("-done"):
            continue  # an async op's `-done` waits for its `-start`, the launch
        name, op, kind, grid = m.group("name"), m.group("op"), "", None
        shape = m.group("shape")
        if op.endswith("-start"):  # ((operands), result, context): name it by what it runs
            name = _field(line, r"\bcalls=%([^,\s]+)") or name
            shape = shape[_inner_tuple_end(shape) :]
            shape = shape[: shape.index("]") + 1] if "]" in shape else ""
        body = _field(line, r"\bbody=%([^,\s]+)")
        if op == "while" and body in comps:
            trips = int(_field(line, r'known_trip_count":\{"n":"(\d+)"') or 1)
            out += _launches(comps[body], comps, repeat * trips)
            continue
        if op == "fusion":
            kind = _field(line, r"kind=(\w+)")
        elif op == "custom-call":
            kind = _field(line, r'custom_call_target="([^"]+)"')
            name = _field(line, r'\bname = "([^"]+)"') or name
            axes = [_field(line, rf"grid_{a} = (\d+)") for a in "xyz"]
            grid = tuple(int(g) for g in axes) if all(axes) else None
        out_bytes = array_bytes(shape, aliased_outputs(line))
        called = comps.get(_field(line, r"\bcalls=%([^,\s]+)"))
        moves = op in MOVING_OPS or (called is not None and _only_moves(called))
        out.append(Launch(name, op, kind, out_bytes, grid, repeat, moves))
    return out


def _only_moves(lines: list[str]) -> bool:
    """Whether a fused computation only slices, reshapes and copies its parameters."""
    ops = {m.group("op") for m in map(_INSTRUCTION.match, lines) if m}
    return bool(ops) and ops <= MOVING_OPS | {"parameter", "constant"}


def _inner_tuple_end(shape: str) -> int:
    """Index just past the first element of a tuple shape that starts with a tuple."""
    depth = 0
    for i, c in enumerate(shape):
        depth += (c == "(") - (c == ")")
        if c == ")" and depth == 1:
            return i + 1
    return 0


def _field(line: str, pattern: str) -> str:
    m = re.search(pattern, line)
    return m.group(1) if m else ""


def counts(items: list[Launch]) -> list[tuple[str, int]]:
    """Launches a step per name family, most first."""
    per_step: collections.Counter[str] = collections.Counter()
    for x in items:
        per_step[x.family] += x.repeat
    return per_step.most_common()


def one_period(items: list[Launch], marker: str) -> list[Launch]:
    """The launches from one `marker` kernel up to the next: an unrolled step's layer
    (marker: its attention kernel's name), or a scanned step's loop body. Empty when the
    marker occurs once outside a loop."""
    at = [i for i, x in enumerate(items) if x.family == marker]
    if len(at) == 1 and items[at[0]].repeat > 1:  # a scanned step: the loop body
        return [x for x in items if x.repeat == items[at[0]].repeat]
    if len(at) < 3:
        return items[at[0] : at[1]] if len(at) == 2 else []
    return items[at[1] : at[2]]  # the second layer: the first may hold the step's prologue
