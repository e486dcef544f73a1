"""Package discovery for the folder layout: kvctl/, codecs/ and server/ install as one `kvctl`.

codecs/ and server/ sit at the top level (the design card's layout) but import as kvctl.codecs
and kvctl.server (a top-level `codecs` would shadow the standard library). setuptools' own
discovery finds every package below each folder, data-only folders (bundled texts, step
profiles) included as namespace packages, so no package can be left out of the wheel by a
hand-written list.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"kvctl": "kvctl", "kvctl.codecs": "codecs", "kvctl.server": "server"}
SKIP = ["*__pycache__*", "codecs", "codecs.*", "server", "server.*"]


def discover(name: str, folder: str) -> list[str]:
    found = find_namespace_packages(folder, exclude=SKIP if name == "kvctl" else ["*__pycache__*"])
    return [name, *(f"{name}.{pkg}" for pkg in found)]


setup(
    package_dir=ROOTS,
    packages=[pkg for name, folder in ROOTS.items() for pkg in discover(name, folder)],
    # every file in a package folder ships (texts, profiles, bases, Redis scripts): a new kind
    # of data file cannot be left out either
    package_data={"": ["*"]},
)
