"""Render the bootstrap: template parameters through a jinja2 template, checked to be JSON. Pure (reads only the
template file)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

import bootstrap_templates
from agent.bootstrap.params import template_params
from agent.config.agent_config import AgentConfig
from agent.config.documents import parse_yaml, read_file, read_file_if_present, to_json, utf8_text
from agent.errors import ConfigError

DEFAULT_TEMPLATE = "envoy_bootstrap.json.j2"


PACKAGED_TEMPLATES = Path(bootstrap_templates.__file__).parent


def default_template_path() -> Path:
    return PACKAGED_TEMPLATES / DEFAULT_TEMPLATE


def _json_filter(value: Any) -> str:
    # ensure_ascii keeps the output ASCII: no encoding surprises for values that came from the environment.
    return to_json(value, "template parameter")


def _compact_json_filter(value: Any) -> str:
    # Node metadata as Istio writes it: compact, sorted keys (istiod and tests read it as one line).
    return to_json(value, "node metadata", compact=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


class _BoundedLoader(jinja2.BaseLoader):
    """jinja2's FileSystemLoader, reading through read_file: a bounded read (`ISTIO_BOOTSTRAP=/dev/zero` is an
    error, not a read that never ends), UTF-8 or a ConfigError."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        path = self.directory.joinpath(*jinja2.loaders.split_template_path(template))
        data = read_file_if_present(path, f"template {path}")
        if data is None:
            raise jinja2.TemplateNotFound(template)
        mtime = _mtime(path)

        def uptodate() -> bool:
            return mtime is not None and _mtime(path) == mtime

        return utf8_text(data, f"template {path}"), str(path), uptodate


class _PackagedBytecodeCache(jinja2.FileSystemBytecodeCache):
    """jinja2's compiled-template cache for the packaged templates, in their own `__pycache__` (as Python keeps a
    module's bytecode): compiling the default template costs 30-50 ms of every start, loading its bytecode 0.1 ms.
    jinja2 checks each entry against the template's source and its own and Python's versions. A directory the agent
    cannot write (an install owned by another user) or read is only not used: the template is compiled as before.
    The image writes it at build time (`pilot-agent render`), as root, for the agent running as 1337 to read."""

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            super().load_bytecode(bucket)
        except OSError:
            bucket.reset()

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            super().dump_bytecode(bucket)
            # jinja2 writes through a NamedTemporaryFile: mode 0600, so the image's cache (written by root at build
            # time) was unreadable to istio-proxy and every start compiled the template again. Readable as the
            # template itself is, like Python's own __pycache__ files.
            os.chmod(self._get_cache_filename(bucket), 0o644)
        except OSError:
            pass


@functools.lru_cache(maxsize=8)
def _environment(directory: Path) -> jinja2.Environment:
    # Cached so the compiled template is reused: compiling the default template costs 30-50 ms, paid at start-up
    # (unless its bytecode is cached) and on every re-render (cert rotation). jinja2's auto_reload still recompiles
    # when the file's mtime changes. A template of the user's own is compiled in memory only: nothing is written
    # beside it.
    cache = _PackagedBytecodeCache(str(directory / "__pycache__")) if directory == PACKAGED_TEMPLATES else None
    env = jinja2.Environment(
        loader=_BoundedLoader(directory),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        bytecode_cache=cache,
    )
    env.filters["json"] = _json_filter
    env.filters["compact_json"] = _compact_json_filter
    return env


def render_template(params: dict[str, Any], template_path: Path) -> bytes:
    """Render `template_path` with `params`; the result must parse as JSON. ConfigError names the template."""
    source = f"template {template_path}"
    try:
        template = _environment(template_path.parent).get_template(template_path.name)
        text = template.render(**params)
    except jinja2.TemplateNotFound:
        raise ConfigError(source, "", "template file not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{source}:{exc.lineno}", "", f"template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise ConfigError(source, "", f"undefined template variable: {exc.message}") from None
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise ConfigError(source, "", f"template failed to render: {exc}") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    _check_document(text, template_path, source)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(source, "", f"rendered output is not valid UTF-8: {exc.reason}") from None


def _check_document(text: str, template_path: Path, source: str) -> None:
    """JSON for JSON templates; a YAML template (written to envoy-rev.yaml, as Istio does) must give a mapping."""
    if ".yaml" in template_path.suffixes:
        document = parse_yaml(text, source, field="rendered output")
        if not isinstance(document, dict):
            raise ConfigError(source, "", "rendered output is not a YAML mapping")
        return
    try:
        json.loads(text)
    except ValueError as exc:
        raise ConfigError(source, "", f"rendered output is not valid JSON: {exc}") from None


def template_path_of(cfg: AgentConfig) -> Path:
    return Path(cfg.template_path) if cfg.template_path else default_template_path()


def render_bootstrap(cfg: AgentConfig) -> bytes:
    """The bytes Envoy's config file must hold. With ProxyConfig.customConfigFile, that file's contents as they
    are (no templating, as Istio); otherwise the rendered template (ISTIO_BOOTSTRAP / --templateFile / default)."""
    if cfg.custom_config_file:
        return read_file(Path(cfg.custom_config_file), "ProxyConfig customConfigFile", cfg.custom_config_file)
    return render_template(template_params(cfg), template_path_of(cfg))
