/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Portico load-balancing maps and lookups shared by the datapath programs (docs/datapath.md).
 * Maps are pinned by name, so that a restarted agent adopts them and forwarding goes on.
 */
#ifndef PORTICO_LB_H
#define PORTICO_LB_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define LB_MAX_SERVICE_ENTRIES 262144
#define LB_MAX_BACKENDS 262144
#define LB_MAX_SOCKETS 262144

/* Frontend scope: the view of clients outside the node, and of clients on it. */
#define LB_SCOPE_EXTERNAL 0
#define LB_SCOPE_INTERNAL 1

/* A frontend (slot 0) or one of its backend slots (1..count). */
struct svc4_key {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 scope;
	__u16 slot;
	__u16 pad;
};

struct svc6_key {
	__be32 address[4];
	__be16 port;
	__u8 proto;
	__u8 scope;
	__u16 slot;
	__u16 pad;
};

/* Slot 0: the frontend, with its backend count. Slot n: backend_id of the n-th backend. */
struct svc_value {
	__u32 backend_id;
	__u16 count;
	__u16 rev_nat_id;
	__u8 flags;
	__u8 pad[3];
};

struct backend4 {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
};

struct backend6 {
	__be32 address[4];
	__be16 port;
	__u8 proto;
	__u8 flags;
};

/* Which frontend a translated socket was opened to, so that getpeername can say so. */
struct sock4_key {
	__u64 cookie;
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct sock4_value {
	__be32 address;
	__be16 port;
	__u16 rev_nat_id;
};

struct sock6_key {
	__u64 cookie;
	__be32 address[4];
	__be16 port;
	__u16 pad[3];
};

struct sock6_value {
	__be32 address[4];
	__be16 port;
	__u16 rev_nat_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc4_key);
	__type(value, struct svc_value);
	__uint(max_entries, LB_MAX_SERVICE_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_svc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend4);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_be4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock4_key);
	__type(value, struct sock4_value);
	__uint(max_entries, LB_MAX_SOCKETS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_sock4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc6_key);
	__type(value, struct svc_value);
	__uint(max_entries, LB_MAX_SERVICE_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_svc6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend6);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_be6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock6_key);
	__type(value, struct sock6_value);
	__uint(max_entries, LB_MAX_SOCKETS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_sock6 SEC(".maps");

/* lb4_lookup_frontend returns the frontend of addr:port/proto in a scope, or NULL. */
static __always_inline struct svc_value *
lb4_lookup_frontend(struct svc4_key *key, __be32 addr, __be16 port, __u8 proto, __u8 scope)
{
	key->address = addr;
	key->port = port;
	key->proto = proto;
	key->scope = scope;
	key->slot = 0;
	key->pad = 0;
	return bpf_map_lookup_elem(&portico_svc4, key);
}

/* lb4_pick_backend picks one of a frontend's backends at random, or returns NULL. */
static __always_inline struct backend4 *
lb4_pick_backend(struct svc4_key *key, const struct svc_value *frontend)
{
	struct svc_value *slot;

	if (frontend->count == 0)
		return NULL;
	key->slot = (bpf_get_prandom_u32() % frontend->count) + 1;
	slot = bpf_map_lookup_elem(&portico_svc4, key);
	if (!slot)
		return NULL;
	return bpf_map_lookup_elem(&portico_be4, &slot->backend_id);
}

static __always_inline struct svc_value *
lb6_lookup_frontend(struct svc6_key *key, const __be32 addr[4], __be16 port, __u8 proto, __u8 scope)
{
	key->address[0] = addr[0];
	key->address[1] = addr[1];
	key->address[2] = addr[2];
	key->address[3] = addr[3];
	key->port = port;
	key->proto = proto;
	key->scope = scope;
	key->slot = 0;
	key->pad = 0;
	return bpf_map_lookup_elem(&portico_svc6, key);
}

static __always_inline struct backend6 *
lb6_pick_backend(struct svc6_key *key, const struct svc_value *frontend)
{
	struct svc_value *slot;

	if (frontend->count == 0)
		return NULL;
	key->slot = (bpf_get_prandom_u32() % frontend->count) + 1;
	slot = bpf_map_lookup_elem(&portico_svc6, key);
	if (!slot)
		return NULL;
	return bpf_map_lookup_elem(&portico_be6, &slot->backend_id);
}

#endif /* PORTICO_LB_H */
