"""Seam ``dp``: ``flwr.supercore.differential_privacy`` names shared by the DP strategies and mods.

Flower's public ``DifferentialPrivacyClientSideFixedClipping`` (server) and
``fixedclipping_mod`` (node) exchange the clipping norm under a config key that Flower does
not export publicly, and the server's noise standard deviation comes from a private helper.
cityfed's central DP (:mod:`server.central_dp`) and the node's clipping policy
(:mod:`clients.clipping`, :mod:`clients.secagg`) must use exactly those, so they are taken
from Flower here, in one place.
"""

from __future__ import annotations

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from flower_compat import register

__all__ = ["KEY_CLIPPING_NORM", "compute_stdv"]


@register("dp")
def _self_test() -> None:
    """The clipping-norm key and noise formula this seam re-exports."""
    import flwr.supercore.differential_privacy as fdp

    assert fdp.KEY_CLIPPING_NORM == "clipping_norm", f"KEY_CLIPPING_NORM is {fdp.KEY_CLIPPING_NORM!r}"
    assert abs(fdp.compute_stdv(2.0, 3.0, 4) - 2.0 * 3.0 / 4) < 1e-12, "compute_stdv(z, clip, n) is no longer z*clip/n"
