"""YAML as the configs mean it: PyYAML's safe loader, with `1e-3` read as a number.

PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent (`1.0e-3`): `lr: 1e-3` or
`lr=1e-3` came back as the string '1e-3' and failed the config's type check. YAML 1.2 (and
Python's `float`) read it as 0.001; this loader adds those forms and changes nothing else.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2's exponent floats (its resolvers copied, the global one kept)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a string the loader would read as a float (a run named `1e5`)."""


for _kind in (_Loader, _Dumper):
    _kind.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def load_yaml(text: str) -> Any:
    """`text` parsed as YAML (safe: plain data only), `1e-3` and `5E4` as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def dump_yaml(data: Any) -> str:
    """`data` as YAML text that `load_yaml` reads back the same (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
