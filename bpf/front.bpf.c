// SPDX-License-Identifier: GPL-2.0
/* The front's data plane, two entry points over one set of maps and one SYN-ACK builder:
 *
 * - synproxy_front (tc ingress, direct action): answers a plain SYN to a protected VIP and port with the
 *   cookie SYN-ACK, built in place and sent back out through the FIB; everything else continues to the
 *   NFQUEUE and the Python front.
 * - synproxy_front_xdp (XDP): the same SYN-ACK, and every other segment to a protected VIP and port
 *   encapsulated to its Maglev backend as encap.encapsulate builds it, flagged VALIDATED when it is a
 *   handshake ACK whose cookie holds.
 *
 * Both handle only what they can handle byte for byte as synproxy/front/handler.py would (docs/front.md);
 * the rest is passed on unchanged and counted, and the queue decides. */
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <linux/udp.h>

#include "synproxy.h"

#define AF_INET 2
#define AF_INET6 10
#define SYN_ACK_WINDOW 65535
#define SYN_ACK_TTL 64
#define ENCAP_TTL 64
#define MAX_TCP_HEADER 60
#define ENCAP_SOURCE_PORT_BASE 0xc000 /* the flow hash's low 14 bits follow */
#define ENCAP_SOURCE_PORT_MASK 0x3fff
#define IP_DF 0x4000

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct front_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* see struct front_forwarding: replaced whole */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct front_forwarding);
} forwarding SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAGLEV_TABLE_SIZE);
	__type(key, __u32);
	__type(value, struct maglev_owners);
} maglev SEC(".maps");

/* The next hop to a backend, as bpf_fib_lookup gave it, per CPU: the lookup costs ~200 ns of a forwarded
 * packet's ~750 (benchmarks/front_xdp_cost.py), and the farm's routes change far more rarely than every
 * ROUTE_CACHE_NS. A direct-mapped array (an array lookup is inlined; a hash map's costs about as much
 * as it saves), each slot tagged with what it holds. */
#define ROUTE_CACHE_NS 100000000ULL /* 100 ms */
#define ROUTE_CACHE_SLOTS 256
struct route {
	__u64 checked_ns; /* bpf_ktime_get_ns() of the lookup; 0: empty */
	__be32 backend;   /* the tag: for this backend */
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ROUTE_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct route);
} routes SEC(".maps");

/* By program (enum front_path), outcome and IP version: both programs may see one packet (a SYN XDP passes
 * because its neighbour is unresolved is answered at tc), so each counts its own. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FRONT_PATH_MAX * FRONT_COUNTER_MAX * 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline int count_on(__u32 path, const struct segment *seg, __u32 outcome, int verdict)
{
	__u32 index = (path * FRONT_COUNTER_MAX + outcome) * 2 + (seg->family == 6);
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1;
	return verdict;
}

static __always_inline int count(const struct segment *seg, __u32 outcome, int verdict)
{
	return count_on(FRONT_PATH_TC, seg, outcome, verdict);
}

static __always_inline int count_xdp(const struct segment *seg, __u32 outcome, int verdict)
{
	return count_on(FRONT_PATH_XDP, seg, outcome, verdict);
}

/* The sum of the TCP pseudo-header: addresses as given (16-byte form), protocol, TCP length. */
static __always_inline __s64 pseudo_header_sum(__u8 family, const __u8 saddr[16], const __u8 daddr[16],
					       __u32 tcp_length)
{
	if (family == 4) {
		struct {
			__u8 saddr[4];
			__u8 daddr[4];
			__u8 zero;
			__u8 protocol;
			__be16 length;
		} v4 = {.protocol = IPPROTO_TCP, .length = bpf_htons(tcp_length)};

		__builtin_memcpy(v4.saddr, &saddr[12], 4);
		__builtin_memcpy(v4.daddr, &daddr[12], 4);
		return bpf_csum_diff(0, 0, (void *)&v4, sizeof(v4), 0);
	}
	struct {
		__u8 saddr[16];
		__u8 daddr[16];
		__be32 length;
		__u8 zero[3];
		__u8 next_header;
	} v6 = {.length = bpf_htonl(tcp_length), .next_header = IPPROTO_TCP};

	__builtin_memcpy(v6.saddr, saddr, 16);
	__builtin_memcpy(v6.daddr, daddr, 16);
	return bpf_csum_diff(0, 0, (void *)&v6, sizeof(v6), 0);
}

/* What the SYN's options say, as parse_tcp_options reads them (a repeated option: the last wins). */
struct syn_options {
	__u16 mss;
	__u8 has_mss;
	__u8 wscale;
	__u8 has_wscale;
	__u8 sack_permitted;
	__u8 has_timestamp;
	__u32 tsval;
};

/* The SYN's TCP header and the walk over its options (bpf_loop verifies one step once, where an
 * unrolled walk of 40 options would branch past the verifier's limit). */
struct option_walk {
	__u8 tcp[64];
	__u32 length; /* of the header, options included */
	__u32 at;
	int parsed;   /* -1 while walking, then 1, or 0 when malformed */
	struct syn_options options;
};

/* One option, as parse_tcp_options reads it; malformed ones end the walk with parsed = 0 (the queue
 * then drops and counts the SYN). Indices are masked into the buffer for the verifier; real ones stay
 * below `length`. */
static long walk_option(__u32 step, void *context)
{
	struct option_walk *walk = context;
	__u32 i = walk->at, length = walk->length;

	if (i >= length) {
		walk->parsed = 1;
		return 1;
	}
	__u8 kind = walk->tcp[i & 63];
	if (kind == TCPOPT_NOP) {
		walk->at = i + 1;
		return 0;
	}
	walk->parsed = kind == TCPOPT_EOL;
	if (kind == TCPOPT_EOL || i + 1 >= length)
		return 1;
	__u8 size = walk->tcp[(i + 1) & 63];
	if (size < 2 || i + size > length)
		return 1;
	switch (kind) {
	case TCPOPT_MSS:
		if (size != TCPOLEN_MSS)
			return 1;
		walk->options.mss = walk->tcp[(i + 2) & 63] << 8 | walk->tcp[(i + 3) & 63];
		walk->options.has_mss = 1;
		break;
	case TCPOPT_WINDOW:
		if (size != TCPOLEN_WINDOW)
			return 1;
		walk->options.wscale = walk->tcp[(i + 2) & 63];
		walk->options.has_wscale = 1;
		break;
	case TCPOPT_SACK_PERM:
		if (size != TCPOLEN_SACK_PERM)
			return 1;
		walk->options.sack_permitted = 1;
		break;
	case TCPOPT_TIMESTAMP:
		if (size != TCPOLEN_TIMESTAMP)
			return 1;
		walk->options.tsval = (__u32)walk->tcp[(i + 2) & 63] << 24 | (__u32)walk->tcp[(i + 3) & 63] << 16 |
				      (__u32)walk->tcp[(i + 4) & 63] << 8 | walk->tcp[(i + 5) & 63];
		walk->options.has_timestamp = 1;
		break;
	}
	walk->parsed = -1;
	walk->at = i + size;
	return 0;
}

/* The cookie's data bits (docs/cookie.md): epoch mod 4, window scale code, SACK, ECN, MSS index. */
static __always_inline __u32 cookie_data(__u8 family, const struct syn_options *options, __u8 sack, __u8 ecn,
					 __u64 epoch)
{
	const __u16 *table = family == 4 ? mss_table_v4 : mss_table_v6;
	__u32 mss_index = 0;

	if (options->has_mss) {
		mss_index = 3;
		while (mss_index && options->mss < table[mss_index])
			mss_index--;
	}
	__u32 wscale = !options->has_wscale ? COOKIE_WSCALE_NONE
		       : options->wscale > COOKIE_WSCALE_MAX ? COOKIE_WSCALE_MAX : options->wscale;

	return (epoch % COOKIE_EPOCH_SLOTS) << COOKIE_EPOCH_SHIFT | wscale << COOKIE_WSCALE_SHIFT |
	       (sack ? COOKIE_SACK_BIT : 0) | (ecn ? COOKIE_ECN_BIT : 0) | mss_index;
}

/* The salt new cookies use now, or 0 when the loader has not (yet) written this epoch's slot. */
static __always_inline const struct salt_slot *minting_slot(__u64 epoch)
{
	__u32 index = epoch % COOKIE_EPOCH_SLOTS;
	const struct salt_slot *slot = bpf_map_lookup_elem(&salts, &index);

	if (!slot || !slot->valid || slot->epoch != epoch || !slot->nkeys)
		return 0;
	return slot;
}

static __always_inline int v4_mapped(const __u8 address[16])
{
	__u64 head;
	__u16 middle;

	__builtin_memcpy(&head, address, 8);
	__builtin_memcpy(&middle, &address[8], 2);
	return !head && !middle && address[10] == 0xff && address[11] == 0xff;
}

/* Packets the kernel drops before netfilter (IPv6: a multicast, loopback, unspecified or IPv4-mapped
 * source, an IPv4-mapped destination) or whose answer it would not send (IPv4: a zero-network,
 * loopback, multicast or broadcast source): left to it, so the program answers no SYN the queue
 * path would not. */
static __always_inline int addresses_refused(const struct segment *seg)
{
	if (seg->family == 4) {
		__u8 first = seg->saddr[12];

		return first == 0 || first == 127 || first >= 224;
	}
	__u64 high, low;

	__builtin_memcpy(&high, seg->saddr, 8);
	__builtin_memcpy(&low, &seg->saddr[8], 8);
	return seg->saddr[0] == 0xff || (!high && (!low || low == bpf_cpu_to_be64(1))) ||
	       v4_mapped(seg->saddr) || v4_mapped(seg->daddr);
}

/* Packet bytes into a buffer, whichever hook runs: `xdp` is a constant at every call, so each program
 * keeps only its own helper. */
static __always_inline long load_bytes(void *ctx, int xdp, __u32 offset, void *to, __u32 length)
{
	return xdp ? bpf_xdp_load_bytes(ctx, offset, to, length) : bpf_skb_load_bytes(ctx, offset, to, length);
}

/* The route back to the client, looked up as the kernel would forward the SYN-ACK it got from the queue.
 * Returns the bpf_fib_lookup result; the egress interface and MAC addresses are left in `fib`. */
static __always_inline int route_back(void *ctx, __u32 ifindex, const struct segment *seg, __u32 length,
				      struct bpf_fib_lookup *fib)
{
	fib->l4_protocol = IPPROTO_TCP;
	fib->sport = seg->dport;
	fib->dport = seg->sport;
	fib->tot_len = length;
	fib->ifindex = ifindex;
	if (seg->family == 4) {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, &seg->daddr[12], 4);
		__builtin_memcpy(&fib->ipv4_dst, &seg->saddr[12], 4);
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, seg->daddr, 16);
		__builtin_memcpy(fib->ipv6_dst, seg->saddr, 16);
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* A SYN-ACK's IP and TCP headers, ready to replace the SYN's. */
struct syn_ack {
	__u8 ip[sizeof(struct ipv6hdr)]; /* IPv4: the first 20 bytes */
	__u8 tcp[64];
	__u32 tcp_length;                /* 24..40 */
};

static __always_inline __u32 ip_header_length(__u8 family)
{
	return family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
}

/* Everything answering a SYN takes but the rewrite: the checks, the option walk, the cookie and the
 * SYN-ACK's headers, as handler._answer_syn builds them. Returns FRONT_SYN_ANSWERED when `answer` is
 * ready, else the outcome of a SYN left to the queue. */
static __always_inline __u32 prepare_syn_ack(void *ctx, int xdp, const struct segment *seg,
					     const struct front_config *cfg, __u32 frame_length,
					     struct syn_ack *answer)
{
	__u32 ip_header = seg->tcp_offset - sizeof(struct ethhdr);
	__u32 tcp_length = seg->tcp_length & 0x3c; /* doff * 4: at most 60 */
	struct option_walk walk = {.at = sizeof(struct tcphdr), .parsed = -1};

	/* Payload, IPv4 options, a length the kernel would refuse: the queue decides. */
	if (seg->ip_length != ip_header + tcp_length || sizeof(struct ethhdr) + seg->ip_length > frame_length ||
	    (seg->family == 4 && ip_header != sizeof(struct iphdr)))
		return FRONT_QUEUED;
	if (tcp_length < sizeof(struct tcphdr))
		return FRONT_QUEUED;
	if (load_bytes(ctx, xdp, seg->tcp_offset, walk.tcp, tcp_length))
		return FRONT_QUEUED;
	walk.length = tcp_length;

	/* Checksums: the IPv4 header's (the kernel checks it after this hook) and the segment's. A local
	 * sender's (a veth's) SYN still carries a partial one: the queue's copy gets it completed. */
	if (seg->family == 4) {
		__u8 header[sizeof(struct iphdr)];

		if (load_bytes(ctx, xdp, sizeof(struct ethhdr), header, sizeof(header)) ||
		    fold(bpf_csum_diff(0, 0, (void *)header, sizeof(header), 0)))
			return FRONT_UNVERIFIED;
	}
	__s64 sum = pseudo_header_sum(seg->family, seg->saddr, seg->daddr, tcp_length);
	if (sum < 0 || fold(bpf_csum_diff(0, 0, (void *)walk.tcp, tcp_length, sum)))
		return FRONT_UNVERIFIED;

	bpf_loop(MAX_OPTIONS_WALKED + 1, walk_option, &walk, 0);
	if (walk.parsed != 1)
		return FRONT_QUEUED;
	const struct syn_options options = walk.options;

	__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
	__u64 epoch = now_ns / cfg->period_ns;
	const struct salt_slot *slot = minting_slot(epoch);
	if (!slot)
		return FRONT_NO_SALT;

	__u8 sack = cfg->sack && options.sack_permitted;
	__u8 ecn = cfg->ecn && (seg->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR);
	__u32 data = cookie_data(seg->family, &options, sack, ecn, epoch);
	union cookie_message message;
	cookie_message_of(&message, seg, seg->seq, epoch, data);
	__u32 cookie = (__u32)(siphash24_48(message.words, slot->keys[0]) & COOKIE_MAC_MASK) << COOKIE_DATA_BITS |
		       data;

	/* The SYN-ACK's TCP header and options, as build_tcp_options orders them. */
	__u8 *reply = answer->tcp;
	struct tcphdr *th = (void *)reply;
	__u32 at = sizeof(struct tcphdr);
	__u16 mss = cfg->mss[seg->family == 4 ? 0 : 1];

	reply[at] = TCPOPT_MSS;
	reply[at + 1] = TCPOLEN_MSS;
	reply[at + 2] = mss >> 8;
	reply[at + 3] = mss & 0xff;
	at += TCPOLEN_MSS;
	if (options.has_timestamp) {
		__u32 tsval = bpf_htonl((__u32)(now_ns / 1000000));
		__u32 tsecr = bpf_htonl(options.tsval);

		reply[at] = sack ? TCPOPT_SACK_PERM : TCPOPT_NOP;
		reply[at + 1] = sack ? TCPOLEN_SACK_PERM : TCPOPT_NOP;
		reply[at + 2] = TCPOPT_TIMESTAMP;
		reply[at + 3] = TCPOLEN_TIMESTAMP;
		__builtin_memcpy(&reply[at + 4], &tsval, 4);
		__builtin_memcpy(&reply[at + 8], &tsecr, 4);
		at += 12;
	} else if (sack) {
		reply[at] = TCPOPT_NOP;
		reply[at + 1] = TCPOPT_NOP;
		reply[at + 2] = TCPOPT_SACK_PERM;
		reply[at + 3] = TCPOLEN_SACK_PERM;
		at += 4;
	}
	if (options.has_wscale) {
		reply[at & 63] = TCPOPT_NOP;
		reply[(at + 1) & 63] = TCPOPT_WINDOW;
		reply[(at + 2) & 63] = TCPOLEN_WINDOW;
		reply[(at + 3) & 63] = cfg->server_wscale;
		at += 4;
	}
	__u32 reply_length = at & 0x3c; /* 24..40, a multiple of 4 */
	th->source = seg->dport;
	th->dest = seg->sport;
	th->seq = bpf_htonl(cookie);
	th->ack_seq = bpf_htonl(seg->seq + 1);
	th->doff = reply_length / 4;
	th->syn = 1;
	th->ack = 1;
	th->ece = ecn;
	th->window = bpf_htons(SYN_ACK_WINDOW);
	sum = pseudo_header_sum(seg->family, seg->daddr, seg->saddr, reply_length);
	if (sum < 0)
		return FRONT_QUEUED;
	th->check = fold(bpf_csum_diff(0, 0, (void *)reply, reply_length, sum));
	answer->tcp_length = reply_length;

	if (seg->family == 4) {
		struct iphdr *ip = (void *)answer->ip;

		ip->version = 4;
		ip->ihl = 5;
		ip->tot_len = bpf_htons(sizeof(struct iphdr) + reply_length);
		ip->frag_off = bpf_htons(IP_DF);
		ip->ttl = SYN_ACK_TTL;
		ip->protocol = IPPROTO_TCP;
		__builtin_memcpy(&ip->saddr, &seg->daddr[12], 4);
		__builtin_memcpy(&ip->daddr, &seg->saddr[12], 4);
		ip->check = fold(bpf_csum_diff(0, 0, (void *)ip, sizeof(*ip), 0));
	} else {
		struct ipv6hdr *ip6 = (void *)answer->ip;

		ip6->version = 6;
		ip6->payload_len = bpf_htons(reply_length);
		ip6->nexthdr = IPPROTO_TCP;
		ip6->hop_limit = SYN_ACK_TTL;
		__builtin_memcpy(&ip6->saddr, seg->daddr, 16);
		__builtin_memcpy(&ip6->daddr, seg->saddr, 16);
	}
	return FRONT_SYN_ANSWERED;
}

static __always_inline int answer_syn(struct __sk_buff *skb, const struct segment *seg,
				      const struct front_config *cfg)
{
	struct syn_ack answer = {};
	__u32 outcome = prepare_syn_ack(skb, 0, seg, cfg, skb->len, &answer);
	if (outcome != FRONT_SYN_ANSWERED)
		return count(seg, outcome, TC_ACT_OK);

	__u32 ip_length = ip_header_length(seg->family);
	__u32 reply_length = answer.tcp_length & 0x3c;
	struct bpf_fib_lookup fib = {};
	int route = route_back(skb, skb->ifindex, seg, ip_length + reply_length, &fib);
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(seg, FRONT_UNROUTED, TC_ACT_OK); /* the kernel's own routing decides */

	/* Rewrite the packet: IP header, TCP header, nothing after. */
	if (bpf_skb_change_tail(skb, sizeof(struct ethhdr) + ip_length + reply_length, 0) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), answer.ip, ip_length, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + ip_length, answer.tcp, reply_length,
				BPF_F_RECOMPUTE_CSUM))
		return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	if (route == BPF_FIB_LKUP_RET_NO_NEIGH) { /* the kernel resolves the next hop's address */
		struct bpf_redir_neigh next_hop = {};

		if (seg->family == 4) {
			next_hop.nh_family = AF_INET;
			next_hop.ipv4_nh = fib.ipv4_dst;
		} else {
			next_hop.nh_family = AF_INET6;
			__builtin_memcpy(next_hop.ipv6_nh, fib.ipv6_dst, 16);
		}
		return count(seg, FRONT_SYN_ANSWERED, bpf_redirect_neigh(fib.ifindex, &next_hop, sizeof(next_hop), 0));
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	return count(seg, FRONT_SYN_ANSWERED, bpf_redirect(fib.ifindex, 0));
}

SEC("tc")
int synproxy_front(struct __sk_buff *skb)
{
	__u32 zero = 0;
	const struct front_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct segment seg = {};

	/* A VLAN tag the device took off stays in the skb: the route back and the redirect would not
	 * carry it, so tagged traffic goes the kernel's way. */
	if (!cfg || !cfg->period_ns || skb->pkt_type != PACKET_HOST || skb->vlan_present ||
	    !parse_segment(skb, &seg) || addresses_refused(&seg))
		return TC_ACT_OK;
	__u16 port = bpf_ntohs(seg.dport);
	if (!bpf_map_lookup_elem(&protected_vips, seg.daddr) || !bpf_map_lookup_elem(&protected_ports, &port))
		return count(&seg, FRONT_NOT_PROTECTED, TC_ACT_OK);
	if ((seg.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)) != TCP_FLAG_SYN)
		return count(&seg, FRONT_QUEUED, TC_ACT_OK);
	return answer_syn(skb, &seg, cfg);
}

/* --- XDP: the whole data plane --- */

/* Out of the interface the packet came in: XDP_TX; out of another: a redirect. */
static __always_inline int send(struct xdp_md *ctx, __u32 ifindex)
{
	return ifindex == ctx->ingress_ifindex ? XDP_TX : bpf_redirect(ifindex, 0);
}

/* Its own BPF function (as forward() is): inlined together, their stack frames would not fit in 512 bytes. */
static __noinline int answer_syn_xdp(struct xdp_md *ctx, const struct segment *seg, const struct front_config *cfg)
{
	__u32 frame_length = ctx->data_end - ctx->data;
	struct syn_ack answer = {};
	__u32 outcome = prepare_syn_ack(ctx, 1, seg, cfg, frame_length, &answer);
	if (outcome != FRONT_SYN_ANSWERED)
		return count_xdp(seg, outcome, XDP_PASS);

	__u32 ip_length = ip_header_length(seg->family);
	__u32 reply_length = answer.tcp_length & 0x3c;
	struct bpf_fib_lookup fib = {};
	/* An unresolved neighbour too: XDP has no bpf_redirect_neigh, the kernel resolves it for the queue. */
	if (route_back(ctx, ctx->ingress_ifindex, seg, ip_length + reply_length, &fib) != BPF_FIB_LKUP_RET_SUCCESS)
		return count_xdp(seg, FRONT_UNROUTED, XDP_PASS);
	if (bpf_xdp_adjust_tail(ctx, (int)(sizeof(struct ethhdr) + ip_length + reply_length) - (int)frame_length))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS); /* unchanged */
	if (bpf_xdp_store_bytes(ctx, 0, fib.dmac, ETH_ALEN) || bpf_xdp_store_bytes(ctx, ETH_ALEN, fib.smac, ETH_ALEN) ||
	    bpf_xdp_store_bytes(ctx, sizeof(struct ethhdr), answer.ip, ip_length) ||
	    bpf_xdp_store_bytes(ctx, sizeof(struct ethhdr) + ip_length, answer.tcp, reply_length))
		return count_xdp(seg, FRONT_UNSENT, XDP_DROP); /* half rewritten */
	return count_xdp(seg, FRONT_SYN_ANSWERED, send(ctx, fib.ifindex));
}

#define MAX_CHECKSUM_BLOCKS 8 /* of 256 bytes: segments up to 2303 bytes are checked here */

/* Sum `length` packet bytes from `offset` into `sum`: bpf_csum_diff reads packet memory in pieces of a
 * constant size (a multiple of 4, at most 512), the last 1-3 bytes padded with zeros. -1 when the
 * segment is longer than this reads. */
static __always_inline __s64 packet_sum(struct xdp_md *ctx, __u32 offset, __u32 length, __s64 sum)
{
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *at = (void *)(long)ctx->data + (offset & 0xff);

#pragma unroll
	for (int i = 0; i < MAX_CHECKSUM_BLOCKS; i++) {
		if (length < 256)
			break;
		if ((void *)(at + 256) > data_end)
			return -1;
		sum = bpf_csum_diff(0, 0, (void *)at, 256, sum);
		at += 256;
		length -= 256;
	}
	if (length >= 256)
		return -1;
#define SUM_PIECE(size)                                                  \
	if (length & (size)) {                                           \
		if ((void *)(at + (size)) > data_end)                    \
			return -1;                                       \
		sum = bpf_csum_diff(0, 0, (void *)at, (size), sum);      \
		at += (size);                                            \
	}
	SUM_PIECE(128)
	SUM_PIECE(64)
	SUM_PIECE(32)
	SUM_PIECE(16)
	SUM_PIECE(8)
	SUM_PIECE(4)
#undef SUM_PIECE
	if (length & 3) {
		__u8 last[4] = {};

		if ((void *)(at + 1) > data_end)
			return -1;
		last[0] = at[0];
		if ((length & 3) > 1) {
			if ((void *)(at + 2) > data_end)
				return -1;
			last[1] = at[1];
		}
		if ((length & 3) > 2) {
			if ((void *)(at + 3) > data_end)
				return -1;
			last[2] = at[2];
		}
		sum = bpf_csum_diff(0, 0, (void *)last, 4, sum);
	}
	return sum;
}

/* Does the segment's TCP checksum hold, as handler's tcp_checksum_valid reads it? */
static __always_inline int segment_checksum_holds(struct xdp_md *ctx, const struct segment *seg)
{
	__u32 length = seg->ip_length - (seg->tcp_offset - sizeof(struct ethhdr));
	__s64 sum = pseudo_header_sum(seg->family, seg->saddr, seg->daddr, length);

	if (sum < 0)
		return 0;
	sum = packet_sum(ctx, seg->tcp_offset, length, sum);
	return sum >= 0 && !fold(sum);
}

/* The next hop to `backend`: this CPU's cached lookup while younger than ROUTE_CACHE_NS, else a new
 * bpf_fib_lookup. It is looked up for a packet of farm_mtu bytes, so a route whose MTU is smaller leaves
 * every packet to the queue. 0 when there is no route or the neighbour is unresolved (XDP has no
 * bpf_redirect_neigh: the kernel resolves it for the queue's packet). */
static __always_inline int route_to_backend(struct xdp_md *ctx, const struct front_forwarding *fwd, __be32 backend,
					    __be16 source_port, struct route *next_hop)
{
	__u32 slot = ((bpf_ntohl(backend) ^ ctx->ingress_ifindex) * 2654435761u) >> 24; /* Knuth's multiplicative hash */
	struct route *cached = bpf_map_lookup_elem(&routes, &slot);
	__u64 now_ns = bpf_ktime_get_ns();

	if (!cached)
		return 0;
	if (cached->backend == backend && cached->ingress_ifindex == ctx->ingress_ifindex &&
	    now_ns - cached->checked_ns < ROUTE_CACHE_NS) {
		*next_hop = *cached;
		return 1;
	}
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_UDP,
		.sport = source_port,
		.dport = fwd->encap_port,
		.tot_len = fwd->farm_mtu,
		.ifindex = ctx->ingress_ifindex,
		.ipv4_src = fwd->farm_address,
		.ipv4_dst = backend,
	};
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		cached->checked_ns = 0;
		return 0;
	}
	*cached = (struct route){.checked_ns = now_ns, .backend = backend, .ingress_ifindex = ctx->ingress_ifindex,
				 .ifindex = fib.ifindex};
	__builtin_memcpy(cached->dmac, fib.dmac, ETH_ALEN);
	__builtin_memcpy(cached->smac, fib.smac, ETH_ALEN);
	*next_hop = *cached;
	return 1;
}

/* Every segment but a SYN to a protected VIP and port: encapsulated to its Maglev backend as
 * handler.handle does, or left to the queue. */
static __noinline int forward(struct xdp_md *ctx, const struct segment *seg, const struct front_config *cfg)
{
	__u32 zero = 0;
	const struct front_forwarding *fwd = bpf_map_lookup_elem(&forwarding, &zero);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_length = data_end - data;
	__u32 ip_header = seg->tcp_offset - sizeof(struct ethhdr);
	__u32 ip_length = seg->ip_length;

	if (!fwd)
		return count_xdp(seg, FRONT_QUEUED, XDP_PASS);
	/* What parse_tcp calls malformed, a frame shorter than its IP packet (the kernel drops both), and
	 * IPv4 options (the handler forwards those; this program leaves them to it). */
	if ((seg->family == 4 && ip_header != sizeof(struct iphdr)) || seg->tcp_length < sizeof(struct tcphdr) ||
	    ip_header + seg->tcp_length > ip_length || sizeof(struct ethhdr) + ip_length > frame_length)
		return count_xdp(seg, FRONT_QUEUED, XDP_PASS);
	if (ip_length + ENCAP_OVERHEAD > fwd->farm_mtu)
		return count_xdp(seg, FRONT_TOO_BIG, XDP_PASS);
	if (seg->family == 4) { /* the kernel checks it after this hook and drops what fails */
		struct iphdr *ip = data + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > data_end || fold(bpf_csum_diff(0, 0, (void *)ip, sizeof(*ip), 0)))
			return count_xdp(seg, FRONT_UNVERIFIED, XDP_PASS);
	}

	__u32 outcome = FRONT_FORWARDED;
	__u8 flags = 0;
	if ((seg->flags & TCP_FLAG_ACK) && !(seg->flags & (TCP_FLAG_RST | TCP_FLAG_FIN))) {
		__u32 cookie = seg->ack - 1;
		__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
		const struct salt_slot *slot = cookie_slot(cookie);

		/* Without the current epoch's salt the map is stale (the front process stalled): it cannot
		 * tell an expired cookie from a salt not written, the handler can. */
		if (!minting_slot(now_ns / cfg->period_ns))
			return count_xdp(seg, FRONT_NO_SALT, XDP_PASS);
		if (!slot || !epoch_accepted(slot->epoch, now_ns, cfg->period_ns, fwd->skew_ns)) {
			outcome = FRONT_FORWARDED_EXPIRED_EPOCH;
		} else if (!cookie_mac_valid(slot, seg, cookie)) {
			outcome = FRONT_FORWARDED_BAD_MAC;
		} else {
			/* The handler drops a validating ACK with a wrong checksum; the queue completes a
			 * local sender's partial one. */
			if (!segment_checksum_holds(ctx, seg))
				return count_xdp(seg, FRONT_UNVERIFIED, XDP_PASS);
			outcome = FRONT_VALIDATED;
			flags = ENCAP_FLAG_VALIDATED;
		}
	}

	__u64 flow = flow_hash(seg, fwd->flow_key);
	__u32 index = flow % MAGLEV_TABLE_SIZE;
	const struct maglev_owners *entry = bpf_map_lookup_elem(&maglev, &index);
	if (!entry)
		return count_xdp(seg, FRONT_QUEUED, XDP_PASS);
	/* Read once: the loader may rewrite them (the former owners first). */
	__be32 backend = entry->current;
	struct former_owners former = entry->former;
	if (!backend)
		return count_xdp(seg, FRONT_QUEUED, XDP_PASS);
	__be16 source_port = bpf_htons(ENCAP_SOURCE_PORT_BASE | (flow & ENCAP_SOURCE_PORT_MASK));
	struct route next_hop;
	if (!route_to_backend(ctx, fwd, backend, source_port, &next_hop))
		return count_xdp(seg, FRONT_UNROUTED, XDP_PASS);

	union encap_message message;
	encap_message_of(&message, fwd->farm_address, backend, seg, flags, &former);
	__u64 mac = bpf_cpu_to_be64(encap_mac(&message, fwd->encap_key));

	/* The queue's copy ends where the IP packet does: drop an Ethernet pad, then make room. */
	if (frame_length > sizeof(struct ethhdr) + ip_length &&
	    bpf_xdp_adjust_tail(ctx, (int)(sizeof(struct ethhdr) + ip_length) - (int)frame_length))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS);
	if (bpf_xdp_adjust_head(ctx, -ENCAP_OVERHEAD))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct encap_header *header = (void *)(udp + 1);
	if ((void *)(header + 1) > data_end)
		return count_xdp(seg, FRONT_UNSENT, XDP_DROP); /* cannot happen: room was just made */

	__builtin_memcpy(eth->h_dest, next_hop.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, next_hop.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	*outer = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(ENCAP_OVERHEAD + ip_length),
		.frag_off = bpf_htons(IP_DF),
		.ttl = ENCAP_TTL,
		.protocol = IPPROTO_UDP,
		.saddr = fwd->farm_address,
		.daddr = backend,
	};
	outer->check = fold(bpf_csum_diff(0, 0, (void *)outer, sizeof(*outer), 0));
	udp->source = source_port;
	udp->dest = fwd->encap_port;
	udp->len = bpf_htons(ENCAP_OVERHEAD - sizeof(struct iphdr) + ip_length);
	udp->check = 0;
	header->magic = ENCAP_MAGIC;
	header->flags = flags;
	header->version = ENCAP_VERSION;
	header->reserved = 0;
	header->former = former;
	__builtin_memcpy(header->mac, &mac, sizeof(mac));
	return count_xdp(seg, outcome, send(ctx, next_hop.ifindex));
}

SEC("xdp")
int synproxy_front_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;
	const struct front_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct segment seg = {};

	/* Multicast and broadcast frames are not for one host (XDP has no pkt_type: a unicast frame for
	 * another host reaches it only in promiscuous mode). */
	if (!cfg || !cfg->period_ns || (void *)(eth + 1) > data_end || (eth->h_dest[0] & 1))
		return XDP_PASS;
	enum parsed parsed = parse_frame(data, data_end, &seg);
	if (parsed == PARSE_OTHER || addresses_refused(&seg))
		return XDP_PASS;
	if (!bpf_map_lookup_elem(&protected_vips, seg.daddr))
		return parsed == PARSE_SEGMENT ? count_xdp(&seg, FRONT_NOT_PROTECTED, XDP_PASS) : XDP_PASS;
	if (parsed == PARSE_UNHANDLED)
		return count_xdp(&seg, FRONT_UNPARSED, XDP_PASS);
	__u16 port = bpf_ntohs(seg.dport);
	if (!bpf_map_lookup_elem(&protected_ports, &port))
		return count_xdp(&seg, FRONT_NOT_PROTECTED, XDP_PASS);
	if (seg.flags & TCP_FLAG_SYN) {
		if (seg.flags & (TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN))
			return count_xdp(&seg, FRONT_QUEUED, XDP_PASS); /* the handler drops it: invalid_flags */
		return answer_syn_xdp(ctx, &seg, cfg);
	}
	return forward(ctx, &seg, cfg);
}

char LICENSE[] SEC("license") = "GPL";
