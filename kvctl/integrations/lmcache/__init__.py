"""kvctl's codecs inside LMCache (0.5.x multiprocess server): serdes and an L2 adapter.

``pip install "kvctl[lmcache]"``, then add one ``--l2-adapter`` JSON to ``lmcache server``
(see the README's LMCache section). LMCache is imported only by the submodules that need
it: ``plugin`` (what the server loads: registers the ``kvctl-*`` serde types and defines
``KvctlFSL2Adapter``) and ``serde``. ``layout`` and ``frame`` work without LMCache.
"""

from kvctl.integrations.lmcache.layout import (
    to_kvctl,
    to_lmcache,
)

PLUGIN_MODULE = "kvctl.integrations.lmcache.plugin"
TESTED_LMCACHE = "0.5.6"


def register_serdes() -> list[str]:
    """Register the ``kvctl-*`` serde types with LMCache (imports LMCache)."""
    from kvctl.integrations.lmcache.serde import register_serdes as _register

    return _register()


__all__ = [
    "PLUGIN_MODULE",
    "TESTED_LMCACHE",
    "register_serdes",
    "to_kvctl",
    "to_lmcache",
]
