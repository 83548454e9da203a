"""The key worker (agent.security.key_worker): the workload key, its CSR and the check of the signed chain made in a
short-lived process, so the agent never loads cryptography on the CA path. The real worker process each time."""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.security import pki
from agent.security.key_worker import KeyWorker
from agent.security.settings import KeyOptions
from tests.support.mesh_pki import MeshCa

IDENTITY = "spiffe://cluster.local/ns/shop/sa/reviews"


async def test_the_worker_makes_the_key_and_csr_and_checks_the_signed_chain() -> None:
    worker = KeyWorker()
    try:
        csr_pem, key_pem = await worker.generate_csr(IDENTITY, KeyOptions(rsa_key_size=2048))
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1, Istio's default

        ca = MeshCa()
        chain = pki.concat_certs(ca.issue(csr_pem, [IDENTITY], 3600))
        assert await worker.check_issued(chain, key_pem) == pki.not_after(chain).timestamp()
        other_chain, _ = ca.workload(IDENTITY)  # another key's certificate: what a broken CA would answer
        with pytest.raises(pki.PkiError, match="private key does not match public key"):
            await worker.check_issued(other_chain, key_pem)
    finally:
        await worker.close()


async def test_a_key_asked_for_ahead_is_the_one_the_csr_gets() -> None:
    worker = KeyWorker()
    try:
        options = KeyOptions(ecc_signature_algorithm="ECDSA", ecc_curve="P384", pkcs8=True)
        await worker.request_csr(IDENTITY, options)
        csr_pem, key_pem = await worker.generate_csr(IDENTITY, options)
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        csr_key = x509.load_pem_x509_csr(csr_pem).public_key()
        assert csr_key.public_bytes(der, public) == key.public_key().public_bytes(der, public)
        # Asked ahead for one identity, then for another: the other one's key.
        await worker.request_csr("spiffe://cluster.local/ns/shop/sa/old", options)
        csr_pem, _ = await worker.generate_csr(IDENTITY, options)
        san = x509.load_pem_x509_csr(csr_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
    finally:
        await worker.close()


async def test_an_unexpected_error_in_the_worker_is_a_pki_error_not_a_dead_worker() -> None:
    # An exception other than PkiError inside the worker (here a TypeError from a request it cannot read; in a pod,
    # e.g. cryptography's UnsupportedAlgorithm on a CA's odd leaf key): an error answer, the worker keeps serving.
    # Before, it died, and the agent's fallback raised the same exception out of the secret cache (exit 74).
    worker = KeyWorker()
    try:
        with pytest.raises(pki.PkiError):
            await worker._ask({"csr": {"identity": IDENTITY, "options": {"no_such_option": 1}}})
        csr, _key = await worker.generate_csr(IDENTITY, KeyOptions())
        assert csr.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
        assert worker._process is not None and worker._process.returncode is None
    finally:
        await worker.close()


async def test_a_bad_key_option_is_a_pki_error() -> None:
    worker = KeyWorker()
    try:
        with pytest.raises(pki.PkiError, match="does not meet the minimum required size"):
            await worker.generate_csr(IDENTITY, KeyOptions(rsa_key_size=1024))
    finally:
        await worker.close()
    assert worker._process is None


async def test_without_a_worker_the_key_is_made_in_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    # A worker gone before it answered (killed here; one that cannot start or hangs is the same case): the
    # certificate is not refused, the work is done in the agent, with one warning saying so.
    worker = KeyWorker()
    try:
        options = KeyOptions(ecc_signature_algorithm="ECDSA")
        await worker.request_csr(IDENTITY, options)
        process = worker._process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="agent.security"):
            csr_pem, key_pem = await worker.generate_csr(IDENTITY, options)
        assert [r.getMessage() for r in caplog.records] == [
            "key worker unavailable (it exited with status -9): making the key and checking the certificate in the"
            " agent"
        ]
        assert x509.load_pem_x509_csr(csr_pem).is_signature_valid
        chain = pki.concat_certs(MeshCa().issue(csr_pem, [IDENTITY], 3600))
        assert await worker.check_issued(chain, key_pem) == pki.not_after(chain).timestamp()
        assert worker._process is None  # no new worker for the rest of this issuance
    finally:
        await worker.close()


def test_not_after_is_the_leafs() -> None:
    chain, _ = MeshCa().workload(IDENTITY)
    assert pki.not_after(chain) > datetime.datetime.now(datetime.UTC)


# An agent in a terminal (its own process group, as a shell's job): it handles SIGINT itself, as the agent's signal
# dispatcher does, and asks the worker for a key once the Ctrl-C has come.
_CTRL_C_AGENT = """
import asyncio, signal, sys
from agent.security.key_worker import KeyWorker
from agent.security.settings import KeyOptions

async def main():
    interrupted = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
    worker = KeyWorker()
    options = KeyOptions(ecc_signature_algorithm="ECDSA")
    await worker.request_csr("spiffe://cluster.local/ns/shop/sa/reviews", options)
    print("asked", flush=True)
    await interrupted.wait()
    await asyncio.sleep(0.5)  # a worker the Ctrl-C reached has printed its traceback and exited by now
    csr, _ = await worker.generate_csr("spiffe://cluster.local/ns/shop/sa/reviews", options)
    await worker.close()
    print("csr" if csr.startswith(b"-----BEGIN CERTIFICATE REQUEST-----") else "no csr", flush=True)

asyncio.run(main())
"""


def test_a_ctrl_c_in_the_terminal_reaches_the_agent_not_the_worker(tmp_path: pathlib.Path) -> None:
    # A Ctrl-C signals the terminal's whole foreground process group. The agent drains and stops on it; the worker,
    # in the agent's group, would die with a Python traceback on the agent's stderr and its key be made again in
    # the agent. In a group of its own (as Envoy), it finishes its work and ends when the agent closes its stdin.
    agent = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_AGENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline() == b"asked\n"
        os.killpg(agent.pid, signal.SIGINT)
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert (agent.returncode, out, err.decode()) == (0, b"csr\n", "")


async def test_a_worker_that_fails_is_one_warning_line_naming_why_not_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A worker that cannot run its code (here: a module it cannot import, as a broken install would make it): its
    # Python traceback would land in the pod's log, many lines for one fact. The warning says it, on one line.
    failing = ["/proc/self/exe", "-S", "-c", "import no_module_the_key_worker_has"]
    monkeypatch.setattr("agent.security.key_worker.worker_command", lambda: failing)
    worker = KeyWorker()
    try:
        with caplog.at_level(logging.WARNING, logger="agent.security"):
            csr_pem, _ = await worker.generate_csr(IDENTITY, KeyOptions(ecc_signature_algorithm="ECDSA"))
    finally:
        await worker.close()
    assert x509.load_pem_x509_csr(csr_pem).is_signature_valid  # made in the agent
    assert [r.getMessage() for r in caplog.records] == [
        "key worker unavailable (it exited with status 1: ModuleNotFoundError: No module named "
        "'no_module_the_key_worker_has'): making the key and checking the certificate in the agent"
    ]
    # The worker's own traceback (`File "<string>", line 1`) is not copied out. Not "no Traceback at all": in the
    # whole suite a logging handler an earlier test left on a closed stream prints logging's own error for the
    # warning above, which is no output of the agent's.
    assert 'File "<string>"' not in capfd.readouterr().err
