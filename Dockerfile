# The decision service's image, as the Helm chart (charts/policy-engine) runs it:
#
#   docker build -t policy-engine:0.1.0 .
#   docker run --rm --network host -v "$PWD/policies:/etc/policy-engine/policies:ro" \
#     -e PE_BACKENDS=llama-8b-a,llama-8b-b policy-engine:0.1.0            # serve a policy directory
#   docker run --rm -v "$PWD/policies:/etc/policy-engine/policies:ro" policy-engine:0.1.0 \
#     check /etc/policy-engine/policies
#
# Debian's Python 3.11; the project and its dependencies in a virtual environment built in a
# first stage, so that the image carries neither pip nor the build's leftovers. It runs as user
# 65532 (the chart's runAsUser) and writes nothing outside /tmp and /var/lib/policy-engine, so
# it runs with a read-only root filesystem (give it a writable /tmp: `--tmpfs /tmp`, the chart's
# emptyDir). Without a mounted policy directory it serves the example policies without their
# TenantSet, so it denies every request, as the chart does without one. tests/image builds it and
# runs it the chart's way.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/policy-engine
COPY pyproject.toml README.md /src/
COPY policy_engine /src/policy_engine
# Behind a proxy that inspects TLS, give pip the proxy's CA as a build secret:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/policy-engine/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/policy-engine/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/policy-engine/bin/policy-engine version
# The example policies, readable by any user whatever the checkout's modes: not their tests,
# and not their TenantSet (its keys are published).
COPY policies /src/policies
RUN install -d -m 755 /out/policies \
 && for f in /src/policies/*.yaml; do \
      case "$f" in *_test.yaml|*/tenants.yaml) ;; *) install -m 644 "$f" /out/policies/ ;; esac; \
    done \
 && /opt/policy-engine/bin/policy-engine check /out/policies

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 policy-engine \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/policy-engine \
      --shell /usr/sbin/nologin policy-engine \
 && install -d -o 65532 -g 65532 /var/lib/policy-engine
COPY --from=build /opt/policy-engine /opt/policy-engine
# The chart mounts its own policy directory here.
COPY --from=build /out/policies /etc/policy-engine/policies
ENV PATH=/opt/policy-engine/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PE_POLICIES=/etc/policy-engine/policies \
    PE_CANARY_STATE=/var/lib/policy-engine/canary-state.json
USER 65532:65532
WORKDIR /var/lib/policy-engine
# gRPC (ext_authz, rate limit, access log, health), Prometheus metrics.
EXPOSE 9001 9090
ENTRYPOINT ["policy-engine"]
CMD ["serve"]
