"""pilot-agent: a Python re-implementation of Istio's sidecar agent (istio-proxy PID 1)."""

__version__ = "0.1.0"
