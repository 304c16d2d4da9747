# syntax=docker/dockerfile:1
#
# Tocsin's container image: every Tocsin binary (`tocsin` and the
# single-service `tocsin-<service>` ones) on a small Debian base, run as a
# non-root user (uid 65532). Configs are mounted at run time
# (/etc/tocsin/tocsin.yaml by default); nothing secret is in the image.
#
#   docker build -t tocsin:0.1.0 .                                    # every service
#   docker build --target remediation -t tocsin-remediation:0.1.0 .   # + kubectl for runbooks
#
# deploy/compose/compose.yaml builds both; the Kubernetes manifests name
# them (deploy/k8s). A test (tests/it/deploy_files.rs) checks this file and
# builds it when a Docker daemon is reachable.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build: the release binaries ----------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The registry and target/ are cache mounts (kept between builds, never in
# the image); the binaries are copied out of target/ before the step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tocsin \
 && mkdir -p /out \
 && for bin in tocsin tocsin-ingest tocsin-incidents tocsin-escalation \
               tocsin-notifier tocsin-chatops tocsin-remediation; do \
      install -m 0755 "target/release/$bin" "/out/$bin"; \
    done

# ---- kubectl for the remediation image (checked against its sha256) ------
FROM debian:${DEBIAN_RELEASE}-slim AS kubectl
ARG KUBECTL_VERSION=v1.32.4
# Set by BuildKit to the platform being built (amd64, arm64).
ARG TARGETARCH
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl /kubectl
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256 /kubectl.sha256
RUN echo "$(cat /kubectl.sha256)  /kubectl" | sha256sum --check --strict - \
 && chmod 0755 /kubectl

# ---- base: what every Tocsin container runs on -------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS base
# CA certificates: the notifier calls Slack, PagerDuty and Twilio over
# HTTPS, chat-ops Slack's response URLs. bash, head and grep (in the base
# image already) serve the compose health checks; no curl is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 tocsin \
 && useradd --system --uid 65532 --gid tocsin --home-dir /var/lib/tocsin \
      --no-create-home --shell /usr/sbin/nologin tocsin \
 && install -d -o tocsin -g tocsin -m 0700 /var/lib/tocsin \
 && install -d -m 0755 /etc/tocsin
COPY --from=build /out/ /usr/local/bin/
# The notifier's default message templates (notifier.templates may point at
# overrides) and the example runbooks (remediation.runbook_dirs).
COPY config/templates/ /usr/share/tocsin/templates/
COPY runbooks/ /usr/share/tocsin/runbooks/
USER 65532:65532
WORKDIR /var/lib/tocsin
ENV TOCSIN_CONFIG=/etc/tocsin/tocsin.yaml \
    TOCSIN_ADMIN_LISTEN=0.0.0.0:9464 \
    TOCSIN_LOG_FORMAT=json
# 8080 ingest, 8082 chat-ops, 9464 /livez, /readyz and /metrics.
EXPOSE 8080 8082 9464
# SIGTERM drains within TOCSIN_GRACE_PERIOD (30s) + 5s of NATS flush: give
# `docker stop` / compose `stop_grace_period` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tocsin"]
CMD ["up"]

# ---- remediation: base + the programs the shipped runbooks run ----------
# (remediation.allowed_programs: kubectl and find; find is in the base.)
FROM base AS remediation
COPY --from=kubectl /kubectl /usr/local/bin/kubectl
ENTRYPOINT ["tocsin-remediation"]
CMD []

# ---- runtime (the default target) ---------------------------------------
FROM base AS runtime
