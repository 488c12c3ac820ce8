/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Portico load-balancing maps and lookups shared by the socket and the packet layer
 * (docs/datapath.md). Maps are pinned by name, so that a restarted agent adopts them and
 * forwarding goes on.
 */
#ifndef PORTICO_LB_H
#define PORTICO_LB_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Defaults sized for 10,000 dual-stack LoadBalancer Services x 3 ports x 10 endpoints
 * (docs/datapath.md "Capacity"); the agent may choose others at load. The service and
 * backend maps are not preallocated: an idle entry costs nothing, a bucket 16 bytes. */
#define LB_MAX_SERVICE_ENTRIES 2097152
#define LB_MAX_BACKENDS 524288
#define LB_MAX_SOCKETS 262144
#define LB_MAX_AFFINITY 262144
#define LB_MAX_MAGLEV 4096
#define LB_MAX_SOURCE_RANGES 65536

/* Frontend scope: the view of clients outside the node, and of clients on it. */
#define LB_SCOPE_EXTERNAL 0
#define LB_SCOPE_INTERNAL 1

/* Frontend flags (slot 0). */
#define SVC_F_MAGLEV 0x1        /* pick by the flow's hash in the frontend's Maglev table */
#define SVC_F_AFFINITY 0x2      /* sessionAffinity ClientIP for affinity_timeout seconds */
#define SVC_F_SOURCE_RANGES 0x4 /* only clients in the frontend's source ranges */

/* Backend flags. */
#define BE_F_LOCAL 0x1 /* on this node: external traffic reaches it without SNAT */

/* A frontend (slot 0) or one of its backend slots (1..). */
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

/* Slot 0: the frontend. Slots 1..count hold the backends to pick from; slots past count
 * hold backends kept only for the flows already on them (terminating ones).
 * Slot n: backend_id of the n-th backend.
 */
struct svc_value {
	__u32 backend_id;
	__u16 count;
	__u16 flags;
	__u32 id;               /* frontend id: affinity, Maglev table, source ranges */
	__u32 affinity_timeout; /* seconds */
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
	__u16 pad;
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
	__u16 pad;
};

/* A client's backend under sessionAffinity ClientIP. Clients on the node are told apart by
 * their network namespace (netns_cookie), clients outside by their address (IPv4 in
 * address[0]).
 */
struct affinity_key {
	__u64 netns_cookie;
	__be32 address[4];
	__u32 id;
	__u32 pad;
};

struct affinity_value {
	__u64 last_used; /* bpf_ktime_get_ns */
	__u32 backend_id;
	__u32 pad;
};

/* loadBalancerSourceRanges: {frontend id, client prefix}; prefixlen counts the id's 32 bits. */
struct srcrange4_key {
	__u32 prefixlen;
	__u32 id;
	__be32 address;
};

struct srcrange6_key {
	__u32 prefixlen;
	__u32 id;
	__be32 address[4];
};

/* The Maglev table size, a prime; the loader sets it (internal/maglev builds the tables). */
volatile const __u32 maglev_size = 16381;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc4_key);
	__type(value, struct svc_value);
	__uint(max_entries, LB_MAX_SERVICE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_svc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend4);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
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
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_svc6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend6);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_be6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock6_key);
	__type(value, struct sock6_value);
	__uint(max_entries, LB_MAX_SOCKETS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_sock6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, LB_MAX_AFFINITY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_affinity SEC(".maps");

/* Frontend id -> maglev_size backend ids. The loader sizes the value; entries are allocated
 * only for Maglev frontends.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__uint(value_size, 16381 * sizeof(__u32));
	__uint(max_entries, LB_MAX_MAGLEV);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct srcrange4_key);
	__type(value, __u8);
	__uint(max_entries, LB_MAX_SOURCE_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_srcrange4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct srcrange6_key);
	__type(value, __u8);
	__uint(max_entries, LB_MAX_SOURCE_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_srcrange6 SEC(".maps");

static __always_inline void copy6(__be32 dst[4], const __be32 src[4])
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int equal6(const __be32 a[4], const __be32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* lb_flow_hash mixes a flow's addresses and ports (murmur3's finaliser): the same flow hashes
 * the same on every node, so every node picks the same Maglev entry for it.
 */
static __always_inline __u32 lb_mix(__u32 h, __u32 v)
{
	v *= 0xcc9e2d51;
	v = (v << 15) | (v >> 17);
	v *= 0x1b873593;
	h ^= v;
	h = (h << 13) | (h >> 19);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 lb_fmix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* lb_affinity_backend returns the backend id a client is bound to, or 0 when it is bound to
 * none or the binding has expired.
 */
static __always_inline __u32 lb_affinity_backend(struct affinity_key *key, const struct svc_value *frontend)
{
	struct affinity_value *v = bpf_map_lookup_elem(&portico_affinity, key);

	if (!v)
		return 0;
	if (bpf_ktime_get_ns() - v->last_used > (__u64)frontend->affinity_timeout * 1000000000ULL)
		return 0;
	return v->backend_id;
}

static __always_inline void lb_affinity_bind(struct affinity_key *key, __u32 backend_id)
{
	struct affinity_value v = {
		.last_used = bpf_ktime_get_ns(),
		.backend_id = backend_id,
	};

	bpf_map_update_elem(&portico_affinity, key, &v, BPF_ANY);
}

/* lb_maglev_backend returns the backend id at hash in a frontend's Maglev table, or 0. */
static __always_inline __u32 lb_maglev_backend(const struct svc_value *frontend, __u32 hash)
{
	__u32 id = frontend->id;
	__u32 size = maglev_size;
	__u32 *table;
	__u32 i;

	table = bpf_map_lookup_elem(&portico_maglev, &id);
	if (!table || size == 0)
		return 0;
	i = hash % size;
	/* The compiler knows i < size; the verifier learns it from this test (size is read-only
	 * data, a known constant), which the empty asm keeps the compiler from dropping.
	 */
	asm volatile("" : "+r"(i));
	if (i >= size)
		return 0;
	return table[i];
}

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

static __always_inline struct svc_value *
lb6_lookup_frontend(struct svc6_key *key, const __be32 addr[4], __be16 port, __u8 proto, __u8 scope)
{
	copy6(key->address, addr);
	key->port = port;
	key->proto = proto;
	key->scope = scope;
	key->slot = 0;
	key->pad = 0;
	return bpf_map_lookup_elem(&portico_svc6, key);
}

/* lb_pick_backend picks one of a frontend's backends: the client's under affinity, else by
 * the flow's hash in the Maglev table, else at random. It returns the backend from the
 * backends map, or NULL when there is none; *id is the backend's id. key is the frontend's
 * key in the svc map and slot its slot field (the families lay their keys out differently).
 */
static __always_inline void *
lb_pick_backend(void *svc, void *key, __u16 *slot, void *backends, const struct svc_value *frontend,
		struct affinity_key *client, __u32 hash, __u32 *id)
{
	struct svc_value *entry;
	void *backend;

	*id = 0;
	if (frontend->count == 0)
		return NULL;
	if (frontend->flags & SVC_F_AFFINITY) {
		*id = lb_affinity_backend(client, frontend);
		backend = *id ? bpf_map_lookup_elem(backends, id) : NULL;
		if (backend)
			goto bind;
	}
	if (frontend->flags & SVC_F_MAGLEV) {
		*id = lb_maglev_backend(frontend, hash);
	} else {
		*slot = (bpf_get_prandom_u32() % frontend->count) + 1;
		entry = bpf_map_lookup_elem(svc, key);
		*slot = 0;
		*id = entry ? entry->backend_id : 0;
	}
	backend = *id ? bpf_map_lookup_elem(backends, id) : NULL;
	if (!backend)
		return NULL;
bind:
	if (frontend->flags & SVC_F_AFFINITY)
		lb_affinity_bind(client, *id);
	return backend;
}

static __always_inline struct backend4 *
lb4_pick_backend(struct svc4_key *key, const struct svc_value *frontend, struct affinity_key *client,
		 __u32 hash, __u32 *id)
{
	return lb_pick_backend(&portico_svc4, key, &key->slot, &portico_be4, frontend, client, hash, id);
}

static __always_inline struct backend6 *
lb6_pick_backend(struct svc6_key *key, const struct svc_value *frontend, struct affinity_key *client,
		 __u32 hash, __u32 *id)
{
	return lb_pick_backend(&portico_svc6, key, &key->slot, &portico_be6, frontend, client, hash, id);
}

#endif /* PORTICO_LB_H */
