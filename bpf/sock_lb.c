// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Socket-layer load balancing for clients on the node: a connect() to a frontend is rewritten
 * to a backend before any packet exists, and getpeername() shows the frontend again.
 */
#include <linux/errno.h>
#include "lib/lb.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6
#endif
#ifndef IPPROTO_UDP
#define IPPROTO_UDP 17
#endif

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline int sock_proto_ok(__u32 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

SEC("cgroup/connect4")
int portico_connect4(struct bpf_sock_addr *ctx)
{
	struct svc4_key key = {};
	struct svc_value *frontend;
	struct backend4 *backend;
	struct sock4_key skey = {};
	struct sock4_value sval = {};
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;

	if (!sock_proto_ok(ctx->protocol))
		return SYS_PROCEED;
	frontend = lb4_lookup_frontend(&key, vip, vport, (__u8)ctx->protocol, LB_SCOPE_INTERNAL);
	if (!frontend)
		return SYS_PROCEED;
	backend = lb4_pick_backend(&key, frontend);
	if (!backend) {
		/* A Service without endpoints refuses connections, as kube-proxy's reject does. */
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}

	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = backend->address;
	skey.port = backend->port;
	sval.address = vip;
	sval.port = vport;
	sval.rev_nat_id = frontend->rev_nat_id;
	bpf_map_update_elem(&portico_sock4, &skey, &sval, BPF_ANY);

	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int portico_getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock4_key skey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct sock4_value *sval = bpf_map_lookup_elem(&portico_sock4, &skey);

	if (sval) {
		ctx->user_ip4 = sval->address;
		ctx->user_port = sval->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int portico_connect6(struct bpf_sock_addr *ctx)
{
	struct svc6_key key = {};
	struct svc_value *frontend;
	struct backend6 *backend;
	struct sock6_key skey = {};
	struct sock6_value sval = {};
	__be32 vip[4];
	__be16 vport = (__be16)ctx->user_port;

	if (!sock_proto_ok(ctx->protocol))
		return SYS_PROCEED;
	/* The context allows 4-byte loads and stores of the address, one word at a time. */
	vip[0] = ctx->user_ip6[0];
	vip[1] = ctx->user_ip6[1];
	vip[2] = ctx->user_ip6[2];
	vip[3] = ctx->user_ip6[3];
	frontend = lb6_lookup_frontend(&key, vip, vport, (__u8)ctx->protocol, LB_SCOPE_INTERNAL);
	if (!frontend)
		return SYS_PROCEED;
	backend = lb6_pick_backend(&key, frontend);
	if (!backend) {
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}

	skey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(skey.address, backend->address, sizeof(skey.address));
	skey.port = backend->port;
	__builtin_memcpy(sval.address, vip, sizeof(sval.address));
	sval.port = vport;
	sval.rev_nat_id = frontend->rev_nat_id;
	bpf_map_update_elem(&portico_sock6, &skey, &sval, BPF_ANY);

	ctx->user_ip6[0] = backend->address[0];
	ctx->user_ip6[1] = backend->address[1];
	ctx->user_ip6[2] = backend->address[2];
	ctx->user_ip6[3] = backend->address[3];
	ctx->user_port = backend->port;
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int portico_getpeername6(struct bpf_sock_addr *ctx)
{
	struct sock6_key skey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = (__be16)ctx->user_port,
	};
	struct sock6_value *sval;

	skey.address[0] = ctx->user_ip6[0];
	skey.address[1] = ctx->user_ip6[1];
	skey.address[2] = ctx->user_ip6[2];
	skey.address[3] = ctx->user_ip6[3];
	sval = bpf_map_lookup_elem(&portico_sock6, &skey);
	if (sval) {
		ctx->user_ip6[0] = sval->address[0];
		ctx->user_ip6[1] = sval->address[1];
		ctx->user_ip6[2] = sval->address[2];
		ctx->user_ip6[3] = sval->address[3];
		ctx->user_port = sval->port;
	}
	return SYS_PROCEED;
}
