# Images of the operator and the node agent:
#   docker build --target operator --build-arg VERSION=v0.1.0 -t ghcr.io/portico-dev/portico-operator:v0.1.0 .
#   docker build --target agent    --build-arg VERSION=v0.1.0 -t ghcr.io/portico-dev/portico-agent:v0.1.0 .
# The development machines have no container engine, so this is not built in CI: it stays
# as simple as it can. The BPF objects are committed (make generate-bpf), so no clang here.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY apis apis
COPY cmd cmd
COPY internal internal
ARG VERSION=dev
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags "-s -w -X github.com/portico-dev/portico/internal/version.version=${VERSION}" -o /out/ ./cmd/operator ./cmd/agent

# The operator needs nothing from the host: non-root, read-only root filesystem (manager.yaml).
FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/operator /operator
USER 65532:65532
ENTRYPOINT ["/operator"]

# The agent loads BPF programs and answers ARP: it runs as root with BPF, NET_ADMIN, NET_RAW
# and PERFMON only (the DaemonSet's securityContext, internal/controller/agentds).
FROM gcr.io/distroless/static-debian12 AS agent
COPY --from=build /out/agent /agent
ENTRYPOINT ["/agent"]
