"""The cleanup policies for a PASID freed while still bound (free before unbind).

The policy is chosen once per run (topology file, CLI option, `build_topology`) and enters
the host as a `Policy`: `Policy.parse` is where a string from outside is validated, so the
host never compares strings. What each policy does is described on `Host.ioasid_free`.
"""

from __future__ import annotations

from enum import StrEnum


class Policy(StrEnum):
    """What the host does with a bound PASID that its VM frees."""

    NAIVE = "naive"  # back to the pool at once; the IOMMU teardown is deferred work
    ORDERED = "ordered"  # a free of a bound PASID is refused (-EBUSY): unbind first
    RECLAIM = "reclaim"  # torn down and defunct now; reusable once every subscriber acked FREE

    @classmethod
    def parse(cls, value: object) -> Policy:
        """The policy named `value`; ValueError with the valid names otherwise."""
        try:
            return cls(str(value))
        except ValueError:
            raise ValueError(f"unknown policy {value!r}; valid: {', '.join(p.value for p in cls)}") from None


DEFAULT_POLICY = Policy.RECLAIM
