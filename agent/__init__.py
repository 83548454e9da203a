"""pilot-agent: a Python re-implementation of Istio's sidecar agent (istio-proxy PID 1)."""

import time

__version__ = "0.1.0"

# When the interpreter first reached the agent's code (monotonic clock): where start-up is measured from when the
# process's own start is the start of a parent that exec'd it (agent/status/readiness.py, process_start_monotonic).
IMPORTED_AT = time.monotonic()
