package datapath

// The BPF objects are generated from bpf/ and committed, so a build needs no clang.
// `make generate-bpf` runs these with clang and libbpf-dev from Debian. The types shared by
// both objects (bpf/lib/lb.h) come from sockLB; maps shared by both are created by sockLB and
// handed to nodePort.
//go:generate go tool bpf2go -tags linux -target amd64 -type svc4_key -type svc6_key -type svc_value -type backend4 -type backend6 -type sock4_key -type sock4_value -type affinity_key -type affinity_value -type srcrange4_key -type srcrange6_key sockLB ../../bpf/sock_lb.c -- -O2 -g -Wall -Werror -I../../bpf -I/usr/include/x86_64-linux-gnu
//go:generate go tool bpf2go -tags linux -target amd64 -type ct_key -type ct_value nodePort ../../bpf/nodeport.c -- -O2 -g -Wall -Werror -I../../bpf -I/usr/include/x86_64-linux-gnu
