"""The Envoy bootstrap: params (pure), render (jinja2, StrictUndefined), write (atomic)."""

from agent.bootstrap.params import template_params
from agent.bootstrap.render import default_template_path, render_bootstrap, render_template
from agent.bootstrap.write import bootstrap_dependencies, bootstrap_path, write_bootstrap
from agent.files import write_atomic

__all__ = [
    "bootstrap_dependencies",
    "bootstrap_path",
    "default_template_path",
    "render_bootstrap",
    "render_template",
    "template_params",
    "write_atomic",
    "write_bootstrap",
]
