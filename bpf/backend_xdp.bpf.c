// SPDX-License-Identifier: GPL-2.0
/* Backend data plane, XDP stage (native XDP on the backend's interface, before GRO): remove the fronts'
 * encapsulation from the unflagged segments of connections this backend holds, so that GRO coalesces
 * the inner TCP stream and the tc program meets plain TCP, which it passes. GRO cannot coalesce the
 * encapsulated packets (UDP to a port no tunnel device owns): without this stage the backend's TCP
 * receives an upload one 1.4 KB segment at a time, where the bypass hands it 64 KB (docs/backend.md).
 * And decide, as the tc program would, the unflagged segments of no connection here at the chain's last
 * hop: within the reset budget (this CPU's bucket) decapsulated for the kernel's RST, a RST or beyond the
 * budget dropped: the forged ACKs of a flood a front cannot tell from established traffic, before GRO
 * and the tc hook. Everything else is passed on untouched to the tc program (bpf/backend.bpf.c), which
 * keeps every other decision: flagged packets (VALIDATED, ICMP, CHAINED and later flags), packets of no
 * connection here it passes on along the Beamer chain, and whatever does not pass the same checks the tc
 * program makes (a trusted front, the header, the MAC, what a front forwards). What this stage strips is
 * what the tc program would have decapsulated and passed: the same inner packet, in the same Ethernet
 * header. */
#include <linux/udp.h>

#include "synproxy.h"
#include "backend_maps.h" /* the tc program's maps: the loader hands this object their fds */

/* This stage's own outcomes, per CPU; synproxy/backend/loader.py names them in this order. */
enum backend_xdp_counter {
	BACKEND_XDP_DECAPSULATED, /* unflagged, of a connection here: the encapsulation removed */
	BACKEND_XDP_FLAGGED,      /* encapsulated and flagged: left to the tc program */
	BACKEND_XDP_LEFT,         /* encapsulated, unflagged, of no connection here but naming a further owner
				   * (passed on by the tc program) or meeting a TIME_WAIT socket of an earlier
				   * connection (delivered past it by the tc program), or failing a check the tc
				   * program makes: left to the tc program */
	BACKEND_XDP_NO_FLOW_DROPPED, /* unflagged, of no connection here, at the last hop, a RST or beyond the
				      * reset budget: dropped, as the tc program would (its no_flow_dropped) */
	BACKEND_XDP_NO_FLOW_RESET,   /* the same within the reset budget, not a RST: decapsulated for the
				      * kernel's RST, as the tc program would pass it (its no_flow_reset) */
	BACKEND_XDP_COUNTER_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BACKEND_XDP_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdp_counters SEC(".maps");

static __always_inline int count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&xdp_counters, &index);

	if (value)
		*value += 1;
	return XDP_PASS;
}

/* Who owns the segment here (flow_owner): the tc program passes an unflagged segment of a connection as it
 * is (pass_if_owned). */
static __always_inline enum flow_owner owner_of(struct xdp_md *ctx, const struct segment *seg)
{
	struct bpf_sock_tuple tuple = {};
	__u32 tuple_size = socket_tuple_of(&tuple, seg);

	struct bpf_sock *skc = bpf_skc_lookup_tcp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	enum flow_owner owner = flow_owner(skc, seg);
	if (skc)
		bpf_sk_release(skc);
	return owner;
}

/* What this stage does with an unflagged segment from a trusted front. */
enum fate {
	FATE_LEFT,        /* to the tc program, untouched */
	FATE_DECAPSULATE, /* of a connection here: what the tc program would pass */
	FATE_RESET,       /* of no connection here, at the last hop, not a RST, a token taken from this CPU's
			   * reset budget: decapsulated for the kernel's RST, as the tc program would pass it */
	FATE_DROP,        /* of no connection here, at the last hop, beyond the reset budget or a RST: what
			   * the tc program would drop (no_flow_dropped) */
};

/* The tc program's checks for an unflagged segment from a front (synproxy_backend, encap_mac_valid,
 * forwarded_by_a_front), then who owns it (the tc program's pass_if_owned). The socket lookup comes
 * before the MAC, so a segment the tc program passes on along the chain is not MACed twice. A bad MAC is
 * left to the tc program, which counts it encap_bad_mac, as it would without this stage. Every segment
 * the stage passes reaches the tc program as plain TCP, which it passes: the reset budget is spent here
 * alone for these segments, from the bucket of the CPU this stage runs on, whichever CPU RPS then hands
 * the packet to (one decision, so the two programs cannot disagree). */
static __always_inline enum fate fate_of(struct xdp_md *ctx, const struct encap_header *header, __be32 outer_saddr,
					 __be32 outer_daddr, const struct segment *seg, const struct backend_config *cfg)
{
	__u16 port = bpf_ntohs(seg->dport);

	if ((seg->flags & TCP_FLAG_SYN) || !bpf_map_lookup_elem(&protected_vips, seg->daddr) ||
	    !bpf_map_lookup_elem(&protected_ports, &port))
		return FATE_LEFT;
	enum flow_owner owner = owner_of(ctx, seg);
	int connection = owner == FLOW_OWNED;
	/* Past a TIME_WAIT socket only the tc program can deliver it (deliver_to_listener). */
	if (owner == FLOW_TIME_WAIT_PAST || (!connection && next_owner(header, outer_daddr)) ||
	    !encap_mac_valid(header, outer_saddr, outer_daddr, seg))
		return FATE_LEFT;
	if (connection)
		return FATE_DECAPSULATE;
	return !(seg->flags & TCP_FLAG_RST) && reset_allowed(cfg) ? FATE_RESET : FATE_DROP;
}

SEC("xdp")
int synproxy_backend_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct encap_header *header = (void *)(udp + 1);
	/* The decapsulated frame: the Ethernet header moved forward, over the end of the encap header. */
	struct ethhdr *inner_eth = (void *)(header + 1) - sizeof(struct ethhdr);
	__u32 zero = 0;
	const struct backend_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct segment seg = {};
	__u8 front[16];

	/* The tc program's test for "encapsulated", and a whole header. */
	if (!cfg || (void *)(header + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(IP_MF_OR_OFFSET)) ||
	    udp->dest != bpf_htons(cfg->encap_port))
		return XDP_PASS;
	if (header->flags)
		return count(BACKEND_XDP_FLAGGED);
	ipv4_mapped(front, &ip->saddr);
	if (!outer_ipv4_sound(ip, data_end - (void *)ip) || header->magic != ENCAP_MAGIC ||
	    header->version != ENCAP_VERSION || header->reserved || !bpf_map_lookup_elem(&trusted_fronts, front))
		return count(BACKEND_XDP_LEFT);

	/* Write the decapsulated frame's Ethernet header where it will start, over the last 14 bytes of the
	 * encap header (kept here, and put back if the segment stays encapsulated), to parse the inner packet
	 * as a frame. */
	struct encap_header kept = *header;
	__be32 outer_saddr = ip->saddr, outer_daddr = ip->daddr;
	__u8 inner_version = (void *)(header + 1) + 1 <= data_end ? *(__u8 *)(header + 1) >> 4 : 0;
	if (inner_version != 4 && inner_version != 6)
		return count(BACKEND_XDP_LEFT);
	__builtin_memcpy(inner_eth->h_dest, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(inner_eth->h_source, eth->h_source, ETH_ALEN);
	inner_eth->h_proto = bpf_htons(inner_version == 6 ? ETH_P_IPV6 : ETH_P_IP);
	enum fate fate = parse_frame(inner_eth, data_end, &seg) == PARSE_SEGMENT
				 ? fate_of(ctx, &kept, outer_saddr, outer_daddr, &seg, cfg) : FATE_LEFT;
	if (fate == FATE_DROP) {
		count(BACKEND_XDP_NO_FLOW_DROPPED);
		return XDP_DROP;
	}
	if (fate == FATE_LEFT) {
		__builtin_memcpy(header, &kept, sizeof(kept));
		return count(BACKEND_XDP_LEFT);
	}
	/* Cannot fail (the inner frame lies inside the packet), but a failure leaves the packet as it was:
	 * the pointers are read again after the helper. */
	if (bpf_xdp_adjust_head(ctx, ENCAP_OVERHEAD)) {
		header = (void *)(long)ctx->data + sizeof(struct ethhdr) + ENCAP_OVERHEAD - sizeof(*header);
		if ((void *)(header + 1) <= (void *)(long)ctx->data_end)
			__builtin_memcpy(header, &kept, sizeof(kept));
		return count(BACKEND_XDP_LEFT);
	}
	return count(fate == FATE_RESET ? BACKEND_XDP_NO_FLOW_RESET : BACKEND_XDP_DECAPSULATED);
}

char LICENSE[] SEC("license") = "GPL";
