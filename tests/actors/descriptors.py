"""Work descriptors the actor tests submit by hand (dev_submit / mdev_submit bodies)."""

from vsva.hotpath.layout import PAGE_SIZE


def fill(dev: str, pasid: int, va: int, pages: int = 1, pattern: int = 0x5A) -> dict:
    """A fill descriptor: an mdev's portal takes the guest PASID, a function's the host PASID."""
    return {
        "dev": dev,
        "gpasid" if "mdev" in dev else "hpasid": pasid,
        "op": "fill",
        "src": 0,
        "dst": va,
        "len": pages * PAGE_SIZE,
        "pattern": pattern,
    }
