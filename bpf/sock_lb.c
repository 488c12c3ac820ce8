// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Socket-layer load balancing for clients on the node: a connect() or sendmsg() to a frontend
 * is rewritten to a backend before any packet exists, and getpeername() and recvmsg() show the
 * frontend again. IPv6 sockets that talk to IPv4-mapped addresses (dual-stack sockets) are
 * served from the IPv4 maps.
 */
#include <linux/errno.h>
#include <bpf/bpf_endian.h>
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

/* A frontend without backends refuses connections, as kube-proxy's reject rule does. */
static __always_inline int sock_refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

static __always_inline int is_v4mapped(const __be32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

/* sock4_pick returns the backend for a socket's connection to vip:vport and records the
 * frontend for the socket; NULL when vip:vport is no frontend, or (with *refuse set) when it
 * has no backend.
 */
static __always_inline struct backend4 *
sock4_pick(struct bpf_sock_addr *ctx, __be32 vip, __be16 vport, int *refuse)
{
	struct svc4_key key = {};
	struct svc_value *frontend;
	struct backend4 *backend;
	struct affinity_key client = {};
	struct sock4_key skey = {};
	struct sock4_value sval = {};
	__u32 id;

	*refuse = 0;
	frontend = lb4_lookup_frontend(&key, vip, vport, (__u8)ctx->protocol, LB_SCOPE_INTERNAL);
	if (!frontend)
		return NULL;
	client.netns_cookie = bpf_get_netns_cookie(ctx);
	client.id = frontend->id;
	backend = lb4_pick_backend(&key, frontend, &client, bpf_get_prandom_u32(), &id);
	if (!backend) {
		*refuse = 1;
		return NULL;
	}
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = backend->address;
	skey.port = backend->port;
	sval.address = vip;
	sval.port = vport;
	bpf_map_update_elem(&portico_sock4, &skey, &sval, BPF_ANY);
	return backend;
}

static __always_inline struct sock4_value *
sock4_frontend(struct bpf_sock_addr *ctx, __be32 addr, __be16 port)
{
	struct sock4_key skey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = addr,
		.port = port,
	};

	return bpf_map_lookup_elem(&portico_sock4, &skey);
}

static __always_inline struct backend6 *
sock6_pick(struct bpf_sock_addr *ctx, const __be32 vip[4], __be16 vport, int *refuse)
{
	struct svc6_key key = {};
	struct svc_value *frontend;
	struct backend6 *backend;
	struct affinity_key client = {};
	struct sock6_key skey = {};
	struct sock6_value sval = {};
	__u32 id;

	*refuse = 0;
	frontend = lb6_lookup_frontend(&key, vip, vport, (__u8)ctx->protocol, LB_SCOPE_INTERNAL);
	if (!frontend)
		return NULL;
	client.netns_cookie = bpf_get_netns_cookie(ctx);
	client.id = frontend->id;
	backend = lb6_pick_backend(&key, frontend, &client, bpf_get_prandom_u32(), &id);
	if (!backend) {
		*refuse = 1;
		return NULL;
	}
	skey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(skey.address, backend->address, sizeof(skey.address));
	skey.port = backend->port;
	__builtin_memcpy(sval.address, vip, sizeof(sval.address));
	sval.port = vport;
	bpf_map_update_elem(&portico_sock6, &skey, &sval, BPF_ANY);
	return backend;
}

static __always_inline struct sock6_value *
sock6_frontend(struct bpf_sock_addr *ctx, const __be32 addr[4], __be16 port)
{
	struct sock6_key skey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = port,
	};

	__builtin_memcpy(skey.address, addr, sizeof(skey.address));
	return bpf_map_lookup_elem(&portico_sock6, &skey);
}

static __always_inline int sock4_translate(struct bpf_sock_addr *ctx)
{
	struct backend4 *backend;
	int refuse;

	if (!sock_proto_ok(ctx->protocol))
		return SYS_PROCEED;
	backend = sock4_pick(ctx, ctx->user_ip4, (__be16)ctx->user_port, &refuse);
	if (refuse)
		return sock_refuse();
	if (backend) {
		ctx->user_ip4 = backend->address;
		ctx->user_port = backend->port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock4_restore(struct bpf_sock_addr *ctx)
{
	struct sock4_value *sval = sock4_frontend(ctx, ctx->user_ip4, (__be16)ctx->user_port);

	if (sval) {
		ctx->user_ip4 = sval->address;
		ctx->user_port = sval->port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock6_translate(struct bpf_sock_addr *ctx)
{
	__be32 vip[4];
	__be16 vport = (__be16)ctx->user_port;
	int refuse;

	if (!sock_proto_ok(ctx->protocol))
		return SYS_PROCEED;
	/* The context allows 4-byte loads and stores of the address, one word at a time. */
	vip[0] = ctx->user_ip6[0];
	vip[1] = ctx->user_ip6[1];
	vip[2] = ctx->user_ip6[2];
	vip[3] = ctx->user_ip6[3];
	if (is_v4mapped(vip)) {
		struct backend4 *backend = sock4_pick(ctx, vip[3], vport, &refuse);

		if (refuse)
			return sock_refuse();
		if (backend) {
			ctx->user_ip6[3] = backend->address;
			ctx->user_port = backend->port;
		}
		return SYS_PROCEED;
	}
	struct backend6 *backend = sock6_pick(ctx, vip, vport, &refuse);

	if (refuse)
		return sock_refuse();
	if (backend) {
		ctx->user_ip6[0] = backend->address[0];
		ctx->user_ip6[1] = backend->address[1];
		ctx->user_ip6[2] = backend->address[2];
		ctx->user_ip6[3] = backend->address[3];
		ctx->user_port = backend->port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock6_restore(struct bpf_sock_addr *ctx)
{
	__be32 addr[4];
	__be16 port = (__be16)ctx->user_port;

	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	if (is_v4mapped(addr)) {
		struct sock4_value *sval = sock4_frontend(ctx, addr[3], port);

		if (sval) {
			ctx->user_ip6[3] = sval->address;
			ctx->user_port = sval->port;
		}
		return SYS_PROCEED;
	}
	struct sock6_value *sval = sock6_frontend(ctx, addr, port);

	if (sval) {
		ctx->user_ip6[0] = sval->address[0];
		ctx->user_ip6[1] = sval->address[1];
		ctx->user_ip6[2] = sval->address[2];
		ctx->user_ip6[3] = sval->address[3];
		ctx->user_port = sval->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int portico_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx);
}

SEC("cgroup/sendmsg4")
int portico_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx);
}

SEC("cgroup/getpeername4")
int portico_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_restore(ctx);
}

SEC("cgroup/recvmsg4")
int portico_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_restore(ctx);
}

SEC("cgroup/connect6")
int portico_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_translate(ctx);
}

SEC("cgroup/sendmsg6")
int portico_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_translate(ctx);
}

SEC("cgroup/getpeername6")
int portico_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock6_restore(ctx);
}

SEC("cgroup/recvmsg6")
int portico_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_restore(ctx);
}
