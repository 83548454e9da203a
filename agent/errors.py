"""Exception types and the process exit codes.

Exit codes are API: operators alert on them and kubelet reports them. Every code here is listed in docs/reference.md
("Exit codes"). Add a member here and a row there in the same commit.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    # istio-iptables: rule generation or application failed (Istio exits 1 too).
    IPTABLES_FAILED = 1
    # argparse's own code for a malformed command line.
    USAGE = 2
    # `pilot-agent wait` gave up: Envoy never became ready in time.
    WAIT_TIMEOUT = 4
    # `pilot-agent request`: the admin API answered an error status or could not be reached.
    REQUEST_FAILED = 5
    # Envoy kept crashing: the restart budget is spent (docs/supervision.md, "Crashes").
    ENVOY_RESTART_BUDGET_EXHAUSTED = 70
    # Envoy exited and the agent is configured to exit with it (ENVOY_RESTART_POLICY=exit, Istio's behaviour).
    ENVOY_EXITED = 71
    # The Envoy binary could not be found or executed.
    ENVOY_NOT_FOUND = 72
    # A port the agent must bind (status port) is already in use, or another start-up resource failed.
    STARTUP_FAILED = 73
    # A part of the running agent (status server, xDS proxy, SDS, DNS proxy, local xDS, file watcher) failed
    # unexpectedly; Envoy was drained and stopped as on any shutdown.
    SERVICE_FAILED = 74
    # Insufficient privileges for the requested operation (istio-iptables not run as root).
    NOT_PERMITTED = 77
    # Bad configuration input: env var, file, flag, annotation. The one-line message names source and field.
    CONFIG_ERROR = 78


class AgentError(Exception):
    """An error the CLI turns into one log line and an exit code, without a traceback."""

    exit_code: ExitCode = ExitCode.STARTUP_FAILED

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(AgentError):
    """Bad configuration input. `source` names where it came from (env var, file:line, flag); `field` what."""

    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


class EnvoyNotFoundError(AgentError):
    exit_code = ExitCode.ENVOY_NOT_FOUND


def describe_error(exc: BaseException) -> str:
    """An unexpected exception as one line for an operator: an AgentError's own message, an OSError's file and the
    kernel's words, else the type and message (the traceback goes to the debug log, not here)."""
    if isinstance(exc, AgentError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
