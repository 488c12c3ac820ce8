package datapath

// The BPF objects are generated from bpf/ and committed, so a build needs no clang.
// `make generate-bpf` runs this with clang and libbpf-dev from Debian.
//go:generate go tool bpf2go -tags linux -target amd64 -type svc4_key -type svc6_key -type svc_value -type backend4 -type backend6 -type sock4_key -type sock4_value sockLB ../../bpf/sock_lb.c -- -O2 -g -Wall -Werror -I../../bpf -I/usr/include/x86_64-linux-gnu
