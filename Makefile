# Portico. `make help` lists the targets.

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec

export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
LOCALBIN ?= $(CURDIR)/bin
CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/portico

# The Kubernetes release the tests run against follows go.mod's k8s.io/api (v0.32.3 -> 1.32.3).
K8S_VERSION ?= $(shell $(GO) list -m -f '{{.Version}}' k8s.io/api | sed 's/^v0\./1./')
ENVTEST_ASSETS ?= $(CACHE)/k8s-$(K8S_VERSION)
CONTROLLER_TOOLS_VERSION ?= v0.19.0
CONTROLLER_GEN ?= $(LOCALBIN)/controller-gen-$(CONTROLLER_TOOLS_VERSION)

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_-]+:.*##/ {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

##@ Development

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate CRDs and the operator's and agent's RBAC from the API types and markers.
	$(CONTROLLER_GEN) rbac:roleName=operator crd paths="./apis/...;./internal/controller/...;./internal/operator/..." \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	$(CONTROLLER_GEN) rbac:roleName=agent paths="./internal/agent/..." output:rbac:artifacts:config=config/agent

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate deepcopy functions.
	$(CONTROLLER_GEN) object paths="./apis/..."

.PHONY: bpf-toolchain
bpf-toolchain: ## Install clang, llvm and libbpf headers from Debian when missing (needs root).
	@command -v clang >/dev/null && command -v llvm-strip >/dev/null && test -f /usr/include/bpf/bpf_helpers.h || { \
		echo "installing clang, llvm and libbpf-dev"; apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang llvm libbpf-dev >/dev/null; }

.PHONY: generate-bpf
generate-bpf: bpf-toolchain ## Compile bpf/ into the committed bpf2go objects in internal/datapath.
	$(GO) generate ./internal/datapath/...

GENERATED := apis config internal/datapath

.PHONY: verify-generated
verify-generated: ## Fail when regenerating would change the tree (in a clean clone: the commit is stale).
	@sums() { find $(GENERATED) -type f | sort | xargs sha256sum; }; before=$$(sums); \
	$(MAKE) --no-print-directory manifests generate generate-bpf >/dev/null; \
	if [ "$$before" != "$$(sums)" ]; then \
		echo "Generated files were out of date and are now regenerated; review and commit:"; \
		diff <(echo "$$before") <(sums) | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; exit 1; fi

.PHONY: fmt
fmt: ## Format the Go code.
	$(GO) fmt ./...

.PHONY: vet
vet: ## Vet the Go code, and fail on unformatted files.
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

.PHONY: envtest
envtest: ## Provide etcd, kube-apiserver, kube-controller-manager and kube-scheduler for the tests and the lab.
	@test/tools/k8s-binaries.sh $(K8S_VERSION) $(ENVTEST_ASSETS) kube-controller-manager kube-scheduler >/dev/null
	@mkdir -p $(LOCALBIN) && ln -sfn $(ENVTEST_ASSETS) $(LOCALBIN)/k8s

.PHONY: test-peers
test-peers: ## Install arping and ndisc6 from Debian when missing: the L2 tests' peers (root only; the tests that need them need root).
	@command -v arping >/dev/null && command -v ndisc6 >/dev/null || [ "$$(id -u)" != 0 ] || { \
		echo "installing arping and ndisc6"; apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq arping ndisc6 >/dev/null; }

.PHONY: test
test: verify-generated vet envtest test-peers ## Run every test: unit, property, fuzz seeds, envtest suites, BPF (as root).
	KUBEBUILDER_ASSETS=$(ENVTEST_ASSETS) $(GO) test ./... -count=1

.PHONY: fuzz
fuzz: ## Fuzz the allocator, the annotation parser and the packet programs (as root) for a while (FUZZTIME, default 30s each).
	$(GO) test ./internal/allocator -run '^$$' -fuzz FuzzSteps -fuzztime $(or $(FUZZTIME),30s)
	$(GO) test ./internal/controller/servicelb -run '^$$' -fuzz FuzzRequest -fuzztime $(or $(FUZZTIME),30s)
	$(GO) test ./internal/datapath -run '^$$' -fuzz FuzzPacketLayer -fuzztime $(or $(FUZZTIME),30s)

.PHONY: bench-tools
bench-tools: envtest ## Provide the baselines: kube-proxy built from the module proxy; iptables, nftables, conntrack, ipset and nginx (grpc_pass) from Debian.
	@command -v iptables-restore >/dev/null && command -v nft >/dev/null && command -v conntrack >/dev/null && command -v ipset >/dev/null && command -v nginx >/dev/null || { \
		echo "installing iptables, nftables, conntrack, ipset and nginx"; apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables nftables conntrack ipset nginx >/dev/null; }
	@test/tools/k8s-binaries.sh $(K8S_VERSION) $(ENVTEST_ASSETS) kube-proxy >/dev/null

.PHONY: bench
bench: bench-tools ## Run the benchmarks and print their numbers (see docs/benchmarks.md); root for the datapath.
	$(GO) test ./internal/allocator ./internal/maglev -run '^$$' -bench . -benchmem -count 5
	KUBEBUILDER_ASSETS=$(ENVTEST_ASSETS) $(GO) test ./internal/datapath -run '^$$' -bench . -benchtime 1x -count 1 -timeout 60m
	KUBEBUILDER_ASSETS=$(ENVTEST_ASSETS) $(GO) test ./test/bench -run '^$$' -bench . -benchtime 1x -count 1 -timeout 60m

##@ Run

.PHONY: build
build: ## Build the operator and agent binaries into bin/.
	$(GO) build -o $(LOCALBIN)/operator ./cmd/operator
	$(GO) build -o $(LOCALBIN)/agent ./cmd/agent

.PHONY: lab
lab: envtest build ## Run Portico on simulated nodes with traffic, until Ctrl-C (root; see docs/lab.md).
	$(GO) build -o $(LOCALBIN)/lab ./test/lab
	KUBEBUILDER_ASSETS=$(ENVTEST_ASSETS) $(LOCALBIN)/lab -bin $(LOCALBIN) $(LAB_ARGS) up

.PHONY: lab-down
lab-down: ## Stop a running lab and remove whatever a lab left behind.
	$(GO) run ./test/lab down

.PHONY: run
run: ## Run the operator against the cluster of the current kubeconfig.
	$(GO) run ./cmd/operator --claim-classless-services

$(CONTROLLER_GEN):
	@mkdir -p $(LOCALBIN)
	GOBIN=$(LOCALBIN) $(GO) install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_TOOLS_VERSION)
	mv $(LOCALBIN)/controller-gen $(CONTROLLER_GEN)
