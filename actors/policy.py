"""The cleanup policies for a PASID freed while still bound (free before unbind).

The policy is chosen once per run (topology file, CLI option, `build_topology`) and enters
the host as a `Policy`: `Policy.parse` is where a string from outside is validated, so the
host never compares strings. What each policy does is described on `Host.ioasid_free`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class Choice(StrEnum):
    """A fixed set of names chosen from outside: `parse` validates one where it enters, with a
    one-line error that names the valid values (the error says `policy`, `kernel` ...)."""

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member named `value`; ValueError with the valid names otherwise."""
        try:
            return cls(str(value))
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.__name__.lower()} {value!r}; valid: {valid}") from None


class Policy(Choice):
    """What the host does with a bound PASID that its VM frees."""

    NAIVE = "naive"  # back to the pool at once; the IOMMU teardown is deferred work
    ORDERED = "ordered"  # a free of a bound PASID is refused (-EBUSY): unbind first
    RECLAIM = "reclaim"  # torn down and defunct now; reusable once every subscriber acked FREE


DEFAULT_POLICY = Policy.RECLAIM
