"""The local xDS files of the no-control-plane mode (`--local-xds-dir`), checked as Envoy would read them.

What Envoy refuses before it looks at a single field is refused here, before Envoy starts: an unreadable file,
text that is not YAML (or JSON), no `resources` list, an entry that is not a listener (cluster) or has no name.
A broken file is then exit 78 naming the file, not a LIVE Envoy without its listeners. Envoy judges the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.documents import parse_yaml, read_file, utf8_text
from agent.errors import ConfigError

_RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"


@dataclass(frozen=True)
class XdsFileKind:
    name: str  # the file's name in the directory
    resource_type: str  # the `@type` of each entry
    stats_prefix: str  # Envoy's counters for this subscription
    noun: str

    @property
    def stats_filter(self) -> str:
        return "^" + self.stats_prefix.replace(".", r"\.") + r"\.update_"


_TYPES = "type.googleapis.com/envoy.config"
LDS = XdsFileKind("lds.yaml", f"{_TYPES}.listener.v3.Listener", "listener_manager.lds", "listeners")
CDS = XdsFileKind("cds.yaml", f"{_TYPES}.cluster.v3.Cluster", "cluster_manager.cds", "clusters")
KINDS = (LDS, CDS)


def check_file(path: Path, kind: XdsFileKind) -> int:
    """The number of resources in `path`, or a ConfigError naming the file (and line or entry) and the problem.

    What Envoy would refuse before it looks at a single field: an unreadable file, text that is not YAML (or JSON),
    no `resources` list, an entry that is not a `kind` resource or has no name. Envoy judges the rest."""
    source = str(path)
    document = parse_yaml(utf8_text(read_file(path, source), source), source)
    if not isinstance(document, dict) or not isinstance(document.get("resources", []), list):
        raise ConfigError(source, "", f"expected a mapping with a `resources:` list of {kind.noun}")
    resources: list[Any] = document.get("resources") or []
    for index, resource in enumerate(resources):
        where = f"resources[{index}]"
        if not isinstance(resource, dict):
            raise ConfigError(source, where, f"expected a mapping (a {kind.noun[:-1]}), got {resource!r:.40}")
        given = resource.get("@type")
        if given == _RESOURCE_WRAPPER:
            continue  # a Resource wrapper: Envoy unwraps it and judges the inner one
        if given != kind.resource_type:
            raise ConfigError(source, where, f'"@type" must be {kind.resource_type}, got {given!r}')
        if not isinstance(resource.get("name"), str) or not resource["name"]:
            raise ConfigError(source, where, f"a {kind.noun[:-1]} needs a name")
    return len(resources)


def check_directory(directory: Path, source: str) -> None:
    """Both files present and well formed (ConfigError otherwise): called before Envoy's first start."""
    for kind in KINDS:
        path = directory / kind.name
        if not path.is_file():
            raise ConfigError(source, kind.name, f"missing {path} (the {kind.noun} Envoy loads)")
        check_file(path, kind)


def directory_problem(directory: Path) -> str | None:
    """check_directory's finding as a phrase naming the file (`local xDS file /x/cds.yaml is missing ...`), else
    None: why a new Envoy cannot start on the directory now (a crash restart waits for it to be fixed)."""
    for kind in KINDS:
        path = directory / kind.name
        if not path.is_file():
            return f"local xDS file {path} is missing (the {kind.noun} Envoy loads)"
        try:
            check_file(path, kind)
        except ConfigError as exc:
            return f"local xDS file {exc}"
    return None
