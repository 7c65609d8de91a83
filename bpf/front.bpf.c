// SPDX-License-Identifier: GPL-2.0
/* Front fast path (tc ingress, direct action): answer a plain SYN to a protected VIP and port with the
 * cookie SYN-ACK, built in place and sent back out through the FIB, before the packet reaches netfilter.
 * It answers only what it can answer byte for byte as synproxy/front/handler.py would (docs/front.md);
 * everything else, ACKs above all, continues to the NFQUEUE and the Python front. */
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>

#include "synproxy.h"

#define AF_INET 2
#define AF_INET6 10
#define SYN_ACK_WINDOW 65535
#define SYN_ACK_TTL 64
#define MAX_TCP_HEADER 60

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct front_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FRONT_COUNTER_MAX * 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline int count(const struct segment *seg, __u32 outcome, int verdict)
{
	__u32 index = outcome * 2 + (seg->family == 6);
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1;
	return verdict;
}

/* A 32-bit one's-complement sum (bpf_csum_diff's) folded to the 16-bit checksum field's value. */
static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
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

/* The route back to the client, looked up as the kernel would forward the SYN-ACK it got from the queue.
 * Returns the bpf_fib_lookup result; the egress interface and MAC addresses are left in `fib`. */
static __always_inline int route_back(struct __sk_buff *skb, const struct segment *seg, __u32 length,
				      struct bpf_fib_lookup *fib)
{
	fib->l4_protocol = IPPROTO_TCP;
	fib->sport = seg->dport;
	fib->dport = seg->sport;
	fib->tot_len = length;
	fib->ifindex = skb->ifindex;
	if (seg->family == 4) {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, &seg->daddr[12], 4);
		__builtin_memcpy(&fib->ipv4_dst, &seg->saddr[12], 4);
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, seg->daddr, 16);
		__builtin_memcpy(fib->ipv6_dst, seg->saddr, 16);
	}
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

static __always_inline int answer_syn(struct __sk_buff *skb, const struct segment *seg,
				      const struct front_config *cfg)
{
	__u32 ip_header = seg->tcp_offset - sizeof(struct ethhdr);
	__u32 tcp_length = seg->tcp_length & 0x3c; /* doff * 4: at most 60 */
	struct option_walk walk = {.at = sizeof(struct tcphdr), .parsed = -1};

	/* Payload, IPv4 options, a length the kernel would refuse: the queue decides. */
	if (seg->ip_length != ip_header + tcp_length || sizeof(struct ethhdr) + seg->ip_length > skb->len ||
	    (seg->family == 4 && ip_header != sizeof(struct iphdr)))
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	if (tcp_length < sizeof(struct tcphdr))
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	if (bpf_skb_load_bytes(skb, seg->tcp_offset, walk.tcp, tcp_length))
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	walk.length = tcp_length;

	/* Checksums: the IPv4 header's (the kernel checks it after this hook) and the segment's. A local
	 * sender's (a veth's) SYN still carries a partial one: the queue's copy gets it completed. */
	if (seg->family == 4) {
		__u8 header[sizeof(struct iphdr)];

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), header, sizeof(header)) ||
		    fold(bpf_csum_diff(0, 0, (void *)header, sizeof(header), 0)))
			return count(seg, FRONT_UNVERIFIED, TC_ACT_OK);
	}
	__s64 sum = pseudo_header_sum(seg->family, seg->saddr, seg->daddr, tcp_length);
	if (sum < 0 || fold(bpf_csum_diff(0, 0, (void *)walk.tcp, tcp_length, sum)))
		return count(seg, FRONT_UNVERIFIED, TC_ACT_OK);

	bpf_loop(MAX_OPTIONS_WALKED + 1, walk_option, &walk, 0);
	if (walk.parsed != 1)
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	const struct syn_options options = walk.options;

	__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
	__u64 epoch = now_ns / cfg->period_ns;
	const struct salt_slot *slot = minting_slot(epoch);
	if (!slot)
		return count(seg, FRONT_NO_SALT, TC_ACT_OK);

	__u8 sack = cfg->sack && options.sack_permitted;
	__u8 ecn = cfg->ecn && (seg->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR);
	__u32 data = cookie_data(seg->family, &options, sack, ecn, epoch);
	union cookie_message message;
	cookie_message_of(&message, seg, seg->seq, epoch, data);
	__u32 cookie = (__u32)(siphash24_48(message.words, slot->keys[0]) & COOKIE_MAC_MASK) << COOKIE_DATA_BITS |
		       data;

	/* The SYN-ACK's TCP header and options, as build_tcp_options orders them. */
	__u8 reply[64] = {};
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
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	th->check = fold(bpf_csum_diff(0, 0, (void *)reply, reply_length, sum));

	__u32 ip_length = seg->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	struct bpf_fib_lookup fib = {};
	int route = route_back(skb, seg, ip_length + reply_length, &fib);
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(seg, FRONT_UNROUTED, TC_ACT_OK); /* the kernel's own routing decides */

	/* Rewrite the packet: IP header, TCP header, nothing after. */
	if (bpf_skb_change_tail(skb, sizeof(struct ethhdr) + ip_length + reply_length, 0))
		return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	if (seg->family == 4) {
		struct iphdr ip = {.version = 4, .ihl = 5, .tot_len = bpf_htons(ip_length + reply_length),
				   .frag_off = bpf_htons(0x4000), .ttl = SYN_ACK_TTL, .protocol = IPPROTO_TCP};

		__builtin_memcpy(&ip.saddr, &seg->daddr[12], 4);
		__builtin_memcpy(&ip.daddr, &seg->saddr[12], 4);
		ip.check = fold(bpf_csum_diff(0, 0, (void *)&ip, sizeof(ip), 0));
		if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM))
			return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	} else {
		struct ipv6hdr ip6 = {.version = 6, .payload_len = bpf_htons(reply_length),
				      .nexthdr = IPPROTO_TCP, .hop_limit = SYN_ACK_TTL};

		__builtin_memcpy(&ip6.saddr, seg->daddr, 16);
		__builtin_memcpy(&ip6.daddr, seg->saddr, 16);
		if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &ip6, sizeof(ip6), BPF_F_RECOMPUTE_CSUM))
			return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	}
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + ip_length, reply, reply_length, BPF_F_RECOMPUTE_CSUM))
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

char LICENSE[] SEC("license") = "GPL";
