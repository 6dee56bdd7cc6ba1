"""Exact FAR amounts.

Amounts are integers of base units: 1 FAR = 10**18 base units, so any price the plan uses
(0.0001 FAR per token) is exact and splits leave at most one base unit of rounding per node,
assigned deterministically (largest remainder).  Decimal is used only at the edges (config,
NUMERIC columns, JSON); floats never touch money.
"""
from __future__ import annotations

from decimal import Context, Decimal

DECIMALS = 18
SCALE = 10**DECIMALS
_EXACT = Context(prec=80)  # wide enough for any NUMERIC(38,18) amount in base units: nothing rounds


def to_base_units(far: Decimal | str | int) -> int:
    value = Decimal(far) if not isinstance(far, Decimal) else far
    if not value.is_finite() or value < 0:
        raise ValueError(f"amount must be a finite non-negative number of FAR, got {far!r}")
    if value.adjusted() > 38:  # 1E+999999999 would become a gigabyte integer below; NUMERIC(38,18) holds < 1E+20
        raise ValueError(f"{far} FAR is larger than any amount the ledger can hold")
    # Exact integer arithmetic (no context, nothing rounds), and a third cheaper than scaling the Decimal:
    # the ledger converts every amount of every outcome it reads.
    numerator, denominator = value.as_integer_ratio()
    units, rest = divmod(numerator * SCALE, denominator)
    if rest:
        raise ValueError(f"{far} FAR is finer than one base unit (1e-{DECIMALS} FAR)")
    return units


def to_far(base_units: int) -> Decimal:
    """Exact Decimal FAR value of an integer amount (for NUMERIC columns and display)."""
    return Decimal(base_units).scaleb(-DECIMALS, _EXACT)


def text(far: Decimal) -> str:
    """Plain decimal notation without trailing zeros ('0.0003', never '3E-4' or '0.000300...')."""
    out = format(far, "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out
