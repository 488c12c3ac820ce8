// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Packet-layer load balancing for traffic from outside the node (docs/datapath.md): NodePort,
 * ExternalIP and LoadBalancer frontends arriving on an external interface.
 *
 * Ingress: a packet of a known flow is translated as conntrack says; the first packet of a
 * flow to a frontend picks a backend, records the flow both ways, DNATs (and, for a backend on
 * another node, SNATs to this node so the reply comes back here) and is sent on with a FIB
 * lookup. Replies of SNATed flows come back to this node and are translated back at ingress;
 * replies of local backends (no SNAT) are translated back at egress.
 *
 * Untouched packets go on to the next program (TC_ACT_UNSPEC); malformed IP and transport
 * headers, which the kernel would drop anyway, are dropped; fragments pass untranslated.
 */
#include <stddef.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include "lib/lb.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define IPV6_MAX_EXT_HEADERS 4
#define SNAT_PORT_TRIES 8
#define REJECT_SAMPLE 64
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3

/* linux/icmp.h pulls in libc headers; this is the part of its header we need. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused;
};

/* Conntrack entry flags. */
#define CT_F_REVERSE 0x1 /* a reply: translate the source back to the frontend */
#define CT_F_SNAT 0x2    /* the flow is SNATed to this node */

/* A flow's tuple as the packet carries it; IPv4 addresses are IPv4-mapped. */
struct ct_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Forward: addr:port is the backend (new destination); with CT_F_SNAT nat_addr:nat_port is
 * the node's address (new source). Reverse: addr:port is the frontend (new source); with
 * CT_F_SNAT nat_addr:nat_port is the client (new destination).
 */
struct ct_value {
	__be32 addr[4];
	__be32 nat_addr[4];
	__be16 port;
	__be16 nat_port;
	__u32 backend_id;
	__u8 flags;
	__u8 pad[3];
};

/* Flows live in two tables, so that new flows cannot push out established ones: a flow
 * starts in portico_ct_new and moves to portico_ct when it is confirmed, on the first reply
 * that is not a SYN or RST (for UDP, the first reply). A flood of SYNs from spoofed sources,
 * whose handshakes never complete, churns portico_ct_new alone.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 131072); /* the loader sets the size */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 32768); /* the loader sets the size */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} portico_ct_new SEC(".maps");

/* The packet being translated: its tuple and where its headers are. */
struct flow {
	struct ct_key t;
	__u32 l4;   /* offset of the transport header */
	__u32 csum; /* offset of the transport checksum */
	__u8 v6;
	__u8 tcp_flags;
};

#define TCP_F_SYN 0x02
#define TCP_F_RST 0x04

enum parse_result { PARSE_OK, PARSE_PASS, PARSE_DROP };

static __always_inline void v4mapped(__be32 out[4], __be32 addr)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = addr;
}

static __always_inline int transport(struct __sk_buff *skb, struct flow *f, __u32 l4, __u32 end)
{
	/* Ports, and for TCP up to its flags, in one read. */
	__u8 h[14];
	__be16 *ports = (__be16 *)h;
	__u32 hlen = f->t.proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);

	if (l4 + hlen > end)
		return PARSE_DROP;
	if (f->t.proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4, h, 14) < 0)
			return PARSE_DROP;
		f->tcp_flags = h[13];
	} else if (bpf_skb_load_bytes(skb, l4, h, 4) < 0) {
		return PARSE_DROP;
	}
	f->l4 = l4;
	f->csum = l4 + (f->t.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	f->t.sport = ports[0];
	f->t.dport = ports[1];
	return PARSE_OK;
}

static __always_inline int parse4(struct __sk_buff *skb, struct flow *f)
{
	struct iphdr ip;
	__u32 len;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
		return PARSE_DROP;
	len = bpf_ntohs(ip.tot_len);
	if (len < ip.ihl * 4 || ETH_HLEN + len > skb->len)
		return PARSE_DROP;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return PARSE_PASS;
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_PASS;
	f->t.proto = ip.protocol;
	v4mapped(f->t.saddr, ip.saddr);
	v4mapped(f->t.daddr, ip.daddr);
	return transport(skb, f, ETH_HLEN + ip.ihl * 4, ETH_HLEN + len);
}

static __always_inline int parse6(struct __sk_buff *skb, struct flow *f)
{
	struct ipv6hdr ip;
	struct {
		__u8 nexthdr;
		__u8 len;
	} ext;
	__u32 off = ETH_HLEN + sizeof(ip);
	__u32 end;
	__u8 nexthdr;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 6)
		return PARSE_DROP;
	end = off + bpf_ntohs(ip.payload_len);
	if (end > skb->len)
		return PARSE_DROP;
	nexthdr = ip.nexthdr;
#pragma unroll
	for (i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		if (nexthdr != NEXTHDR_HOP && nexthdr != NEXTHDR_ROUTING && nexthdr != NEXTHDR_DEST)
			break;
		if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)) < 0)
			return PARSE_DROP;
		nexthdr = ext.nexthdr;
		off += (ext.len + 1) * 8;
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
		return PARSE_PASS; /* fragments, ICMPv6, too many extension headers */
	f->v6 = 1;
	f->t.proto = nexthdr;
	copy6(f->t.saddr, ip.saddr.in6_u.u6_addr32);
	copy6(f->t.daddr, ip.daddr.in6_u.u6_addr32);
	return transport(skb, f, off, end);
}

static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	__be16 proto;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return PARSE_PASS;
	if (proto == bpf_htons(ETH_P_IP))
		return parse4(skb, f);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse6(skb, f);
	return PARSE_PASS;
}

static __always_inline __u64 l4_csum_flags(const struct flow *f)
{
	return f->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* set_addr rewrites the source or destination address and the checksums that cover it. */
static __always_inline int set_addr(struct __sk_buff *skb, struct flow *f, int dst, __be32 addr[4])
{
	__be32 *old = dst ? f->t.daddr : f->t.saddr;

	if (equal6(old, addr))
		return 0;
	if (!f->v6) {
		__u32 off = ETH_HLEN + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));

		if (bpf_l4_csum_replace(skb, f->csum, old[3], addr[3], l4_csum_flags(f) | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old[3], addr[3], 4) < 0 ||
		    bpf_skb_store_bytes(skb, off, &addr[3], 4, 0) < 0)
			return -1;
	} else {
		__u32 off = ETH_HLEN + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		__s64 diff = bpf_csum_diff(old, 16, addr, 16, 0);

		if (bpf_l4_csum_replace(skb, f->csum, 0, diff, l4_csum_flags(f) | BPF_F_PSEUDO_HDR) < 0 ||
		    bpf_skb_store_bytes(skb, off, addr, 16, 0) < 0)
			return -1;
	}
	copy6(old, addr);
	return 0;
}

static __always_inline int set_port(struct __sk_buff *skb, struct flow *f, int dst, __be16 port)
{
	__be16 *old = dst ? &f->t.dport : &f->t.sport;

	if (*old == port)
		return 0;
	if (bpf_l4_csum_replace(skb, f->csum, *old, port, l4_csum_flags(f) | 2) < 0 ||
	    bpf_skb_store_bytes(skb, f->l4 + (dst ? 2 : 0), &port, 2, 0) < 0)
		return -1;
	*old = port;
	return 0;
}

static __always_inline int nat_forward(struct __sk_buff *skb, struct flow *f, struct ct_value *v)
{
	if (set_addr(skb, f, 1, v->addr) || set_port(skb, f, 1, v->port))
		return -1;
	if ((v->flags & CT_F_SNAT) && (set_addr(skb, f, 0, v->nat_addr) || set_port(skb, f, 0, v->nat_port)))
		return -1;
	return 0;
}

static __always_inline int nat_reverse(struct __sk_buff *skb, struct flow *f, struct ct_value *v)
{
	if (set_addr(skb, f, 0, v->addr) || set_port(skb, f, 0, v->port))
		return -1;
	if ((v->flags & CT_F_SNAT) && (set_addr(skb, f, 1, v->nat_addr) || set_port(skb, f, 1, v->nat_port)))
		return -1;
	return 0;
}

/* fib_lookup routes the packet as its tuple now reads. */
static __always_inline int fib_lookup(struct __sk_buff *skb, const struct flow *f, struct bpf_fib_lookup *fib, __u32 flags)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = f->v6 ? AF_INET6 : AF_INET;
	fib->l4_protocol = f->t.proto;
	fib->sport = f->t.sport;
	fib->dport = f->t.dport;
	fib->ifindex = skb->ifindex;
	if (f->v6) {
		copy6(fib->ipv6_src, f->t.saddr);
		copy6(fib->ipv6_dst, f->t.daddr);
	} else {
		fib->ipv4_src = f->t.saddr[3];
		fib->ipv4_dst = f->t.daddr[3];
	}
	return bpf_fib_lookup(skb, fib, sizeof(*fib), flags);
}

/* send_on hands a translated packet to the interface its route names. Packets for this node
 * (a host-network backend) and packets the FIB cannot place go up the stack.
 */
static __always_inline int send_on(struct __sk_buff *skb, const struct flow *f, struct bpf_fib_lookup *fib, int rc)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib->dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib->smac, ETH_ALEN, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {};

		if (f->v6) {
			nh.nh_family = AF_INET6;
			copy6(nh.ipv6_nh, fib->ipv6_dst);
		} else {
			nh.nh_family = AF_INET;
			nh.ipv4_nh = fib->ipv4_dst;
		}
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_OK;
}

static __always_inline int backend_alive(const struct flow *f, const struct ct_value *v)
{
	__u32 id = v->backend_id;

	if (f->v6) {
		struct backend6 *b = bpf_map_lookup_elem(&portico_be6, &id);

		return b && equal6(b->address, v->addr) && b->port == v->port;
	}
	struct backend4 *b = bpf_map_lookup_elem(&portico_be4, &id);

	return b && b->address == v->addr[3] && b->port == v->port;
}

static __always_inline __u32 flow_hash(const struct flow *f)
{
	__u32 h = 0x5eed;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		h = lb_mix(h, f->t.saddr[i]);
		h = lb_mix(h, f->t.daddr[i]);
	}
	h = lb_mix(h, ((__u32)f->t.sport << 16) | f->t.dport);
	return lb_fmix(lb_mix(h, f->t.proto));
}

enum pick_result { PICK_OK, PICK_NONE, PICK_DROP, PICK_REJECT };

/* pick finds the external frontend of a new flow and chooses its backend into v. */
static __always_inline int pick(struct flow *f, struct ct_value *v)
{
	struct affinity_key client = {};
	struct svc_value *frontend;
	__u32 id;

	copy6(client.address, f->t.saddr);
	if (f->v6) {
		struct svc6_key key = {};
		struct srcrange6_key range = { .prefixlen = 32 + 128 };
		struct backend6 *b;

		frontend = lb6_lookup_frontend(&key, f->t.daddr, f->t.dport, f->t.proto, LB_SCOPE_EXTERNAL);
		if (!frontend)
			return PICK_NONE;
		range.id = frontend->id;
		copy6(range.address, f->t.saddr);
		if ((frontend->flags & SVC_F_SOURCE_RANGES) && !bpf_map_lookup_elem(&portico_srcrange6, &range))
			return PICK_DROP;
		if (frontend->count == 0)
			return PICK_REJECT;
		client.id = frontend->id;
		b = lb6_pick_backend(&key, frontend, &client, flow_hash(f), &id);
		if (!b)
			return PICK_DROP;
		copy6(v->addr, b->address);
		v->port = b->port;
		v->flags = b->flags & BE_F_LOCAL ? 0 : CT_F_SNAT;
	} else {
		struct svc4_key key = {};
		struct srcrange4_key range = { .prefixlen = 32 + 32 };
		struct backend4 *b;

		frontend = lb4_lookup_frontend(&key, f->t.daddr[3], f->t.dport, f->t.proto, LB_SCOPE_EXTERNAL);
		if (!frontend)
			return PICK_NONE;
		range.id = frontend->id;
		range.address = f->t.saddr[3];
		if ((frontend->flags & SVC_F_SOURCE_RANGES) && !bpf_map_lookup_elem(&portico_srcrange4, &range))
			return PICK_DROP;
		if (frontend->count == 0)
			return PICK_REJECT;
		client.id = frontend->id;
		b = lb4_pick_backend(&key, frontend, &client, flow_hash(f), &id);
		if (!b)
			return PICK_DROP;
		v4mapped(v->addr, b->address);
		v->port = b->port;
		v->flags = b->flags & BE_F_LOCAL ? 0 : CT_F_SNAT;
	}
	v->backend_id = id;
	return PICK_OK;
}

/* ct_lookup finds a flow's entry, confirmed flows first; confirmed says which table. */
static __always_inline struct ct_value *ct_lookup(const struct ct_key *k, int *confirmed)
{
	struct ct_value *v = bpf_map_lookup_elem(&portico_ct, k);

	if (v) {
		*confirmed = 1;
		return v;
	}
	*confirmed = 0;
	return bpf_map_lookup_elem(&portico_ct_new, k);
}

/* confirm moves an unconfirmed flow to portico_ct when its reply f (with entry rv) shows a
 * live peer: both directions' entries, the forward one found from what the reply's says.
 */
static __always_inline void confirm(const struct flow *f, const struct ct_value *rv)
{
	struct ct_key fk = { .dport = rv->port, .proto = f->t.proto };
	struct ct_value *fv;

	if (f->tcp_flags & (TCP_F_SYN | TCP_F_RST))
		return;
	copy6(fk.daddr, rv->addr);
	if (rv->flags & CT_F_SNAT) {
		copy6(fk.saddr, rv->nat_addr);
		fk.sport = rv->nat_port;
	} else {
		copy6(fk.saddr, f->t.daddr);
		fk.sport = f->t.dport;
	}
	fv = bpf_map_lookup_elem(&portico_ct_new, &fk);
	if (!fv)
		return;
	if (bpf_map_update_elem(&portico_ct, &fk, fv, BPF_ANY) < 0 ||
	    bpf_map_update_elem(&portico_ct, &f->t, rv, BPF_ANY) < 0)
		return;
	bpf_map_delete_elem(&portico_ct_new, &fk);
	bpf_map_delete_elem(&portico_ct_new, &f->t);
}

/* track records a new flow both ways. With SNAT it claims a port of the node's address that
 * no other flow to the backend uses: the client's own port when free, else a random one.
 */
static __always_inline int track(struct flow *f, struct ct_value *v)
{
	struct ct_key rkey = { .sport = v->port, .proto = f->t.proto };
	struct ct_value rval = { .port = f->t.dport, .flags = CT_F_REVERSE };
	int i;

	copy6(rkey.saddr, v->addr);
	copy6(rval.addr, f->t.daddr);
	if (!(v->flags & CT_F_SNAT)) {
		copy6(rkey.daddr, f->t.saddr);
		rkey.dport = f->t.sport;
		if (bpf_map_update_elem(&portico_ct_new, &rkey, &rval, BPF_ANY) < 0)
			return -1;
		return bpf_map_update_elem(&portico_ct_new, &f->t, v, BPF_ANY);
	}
	copy6(rkey.daddr, v->nat_addr);
	copy6(rval.nat_addr, f->t.saddr);
	rval.nat_port = f->t.sport;
	rval.flags |= CT_F_SNAT;
	rkey.dport = f->t.sport;
#pragma unroll
	for (i = 0; i < SNAT_PORT_TRIES; i++) {
		if (!bpf_map_lookup_elem(&portico_ct, &rkey) &&
		    bpf_map_update_elem(&portico_ct_new, &rkey, &rval, BPF_NOEXIST) == 0) {
			v->nat_port = rkey.dport;
			return bpf_map_update_elem(&portico_ct_new, &f->t, v, BPF_ANY);
		}
		rkey.dport = bpf_htons(1024 + bpf_get_prandom_u32() % (65536 - 1024));
	}
	return -1;
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* reject answers a flow to a frontend without backends as kube-proxy's REJECT rule does:
 * ICMP port unreachable (for TCP too, so connect() fails at once with ECONNREFUSED), quoting
 * the start of the packet, sent back out of the interface it came in on.
 */
static __always_inline int reject(struct __sk_buff *skb, const struct flow *f)
{
	__u8 sample[REJECT_SAMPLE] = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__u64 n = skb->len;
	__s64 sum;

	if (n > ETH_HLEN + REJECT_SAMPLE)
		n = ETH_HLEN + REJECT_SAMPLE;
	n -= ETH_HLEN;
	/* Tests the compiler may not drop or merge (a 64-bit n is not copied to be widened), so
	 * that the verifier learns both bounds.
	 */
	asm volatile("" : "+r"(n));
	if (n > REJECT_SAMPLE)
		return TC_ACT_SHOT;
	asm volatile("" : "+r"(n));
	if (n < sizeof(struct iphdr) || bpf_skb_load_bytes(skb, ETH_HLEN, sample, n) < 0 ||
	    bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	sum = bpf_csum_diff(0, 0, (__be32 *)sample, REJECT_SAMPLE, 0);
	if (bpf_skb_change_tail(skb, ETH_HLEN + n, 0) < 0)
		return TC_ACT_SHOT;
	if (f->v6) {
		struct ipv6hdr ip = {
			.version = 6,
			.payload_len = bpf_htons(sizeof(struct icmp6hdr) + n),
			.nexthdr = IPPROTO_ICMPV6,
			.hop_limit = 64,
		};
		struct icmp6hdr icmp = { .icmp6_type = ICMPV6_DEST_UNREACH, .icmp6_code = ICMPV6_PORT_UNREACH };
		struct {
			__be32 saddr[4];
			__be32 daddr[4];
			__be32 len;
			__be32 nexthdr;
		} pseudo = { .len = bpf_htonl(sizeof(icmp) + n), .nexthdr = bpf_htonl(IPPROTO_ICMPV6) };

		copy6(ip.saddr.in6_u.u6_addr32, f->t.daddr);
		copy6(ip.daddr.in6_u.u6_addr32, f->t.saddr);
		copy6(pseudo.saddr, f->t.daddr);
		copy6(pseudo.daddr, f->t.saddr);
		sum = bpf_csum_diff(0, 0, (__be32 *)&pseudo, sizeof(pseudo), sum);
		icmp.icmp6_cksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), sum));
		if (bpf_skb_adjust_room(skb, sizeof(ip) + sizeof(icmp), BPF_ADJ_ROOM_MAC, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) < 0)
			return TC_ACT_SHOT;
	} else {
		struct iphdr ip = {
			.version = 4,
			.ihl = 5,
			.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct icmphdr) + n),
			.ttl = 64,
			.protocol = IPPROTO_ICMP,
			.saddr = f->t.daddr[3],
			.daddr = f->t.saddr[3],
		};
		struct icmphdr icmp = { .type = ICMP_DEST_UNREACH, .code = ICMP_PORT_UNREACH };

		ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));
		icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), sum));
		if (bpf_skb_adjust_room(skb, sizeof(ip) + sizeof(icmp), BPF_ADJ_ROOM_MAC, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) < 0)
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc")
int portico_nodeport_ingress(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib;
	struct flow f = {};
	struct ct_value v = {};
	struct ct_value *ct;
	int confirmed, rc;

	/* A frame for another MAC (a switch flooding after a failover, a promiscuous port) is
	 * not this node's to answer: the stack drops it, and so do we by leaving it alone. */
	if (skb->pkt_type == PACKET_OTHERHOST)
		return TC_ACT_UNSPEC;
	rc = parse(skb, &f);
	if (rc != PARSE_OK)
		return rc == PARSE_DROP ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	ct = ct_lookup(&f.t, &confirmed);
	if (ct && (ct->flags & CT_F_REVERSE)) {
		v = *ct;
		if (!confirmed)
			confirm(&f, &v);
		if (nat_reverse(skb, &f, &v))
			return TC_ACT_SHOT;
		return send_on(skb, &f, &fib, fib_lookup(skb, &f, &fib, 0));
	}
	if (ct && backend_alive(&f, ct)) {
		v = *ct;
	} else {
		/* Its backend is gone: pick again. */
		if (ct && confirmed)
			bpf_map_delete_elem(&portico_ct, &f.t);
		else if (ct)
			bpf_map_delete_elem(&portico_ct_new, &f.t);
		switch (pick(&f, &v)) {
		case PICK_NONE:
			return TC_ACT_UNSPEC;
		case PICK_REJECT:
			return reject(skb, &f);
		case PICK_DROP:
			return TC_ACT_SHOT;
		}
		if (v.flags & CT_F_SNAT) {
			struct flow to = f;

			/* The node's address toward the backend becomes the source. */
			copy6(to.t.daddr, v.addr);
			rc = fib_lookup(skb, &to, &fib, BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH);
			if (rc != BPF_FIB_LKUP_RET_SUCCESS)
				return TC_ACT_SHOT;
			if (f.v6)
				copy6(v.nat_addr, fib.ipv6_src);
			else
				v4mapped(v.nat_addr, fib.ipv4_src);
		}
		if (track(&f, &v))
			return TC_ACT_SHOT;
	}
	if (nat_forward(skb, &f, &v))
		return TC_ACT_SHOT;
	return send_on(skb, &f, &fib, fib_lookup(skb, &f, &fib, 0));
}

SEC("tc")
int portico_nodeport_egress(struct __sk_buff *skb)
{
	struct flow f = {};
	struct ct_value v;
	struct ct_value *ct;
	int confirmed, rc;

	rc = parse(skb, &f);
	if (rc != PARSE_OK)
		return TC_ACT_UNSPEC;
	ct = ct_lookup(&f.t, &confirmed);
	if (!ct || !(ct->flags & CT_F_REVERSE))
		return TC_ACT_UNSPEC;
	v = *ct;
	if (!confirmed)
		confirm(&f, &v);
	return nat_reverse(skb, &f, &v) ? TC_ACT_SHOT : TC_ACT_OK;
}
