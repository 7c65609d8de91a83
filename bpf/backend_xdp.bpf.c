// SPDX-License-Identifier: GPL-2.0
/* Backend data plane, XDP stage (native XDP on the backend's interface, before GRO): remove the fronts'
 * encapsulation from the unflagged segments of connections this backend holds, so that GRO coalesces
 * the inner TCP stream. GRO cannot coalesce the encapsulated packets (UDP to a port no tunnel device
 * owns): without this stage the backend's TCP receives an upload one 1.4 KB segment at a time, where
 * the bypass hands it 64 KB (docs/backend.md). Everything else is passed on untouched to the tc program
 * (bpf/backend.bpf.c), which keeps every decision: flagged packets (VALIDATED, ICMP, CHAINED and later
 * flags), packets of no connection here (the Beamer chain and the reset budget), and whatever does not
 * pass the same checks the tc program makes (a trusted front, the header, the MAC, what a front
 * forwards). What this stage strips is what the tc program would have decapsulated and passed: the
 * same inner packet, in the same Ethernet header. */
#include <linux/udp.h>

#include "synproxy.h"
#include "backend_maps.h" /* the tc program's maps: the loader hands this object their fds */

/* This stage's own outcomes, per CPU; synproxy/backend/loader.py names them in this order. */
enum backend_xdp_counter {
	BACKEND_XDP_DECAPSULATED, /* unflagged, of a connection here: the encapsulation removed */
	BACKEND_XDP_FLAGGED,      /* encapsulated and flagged: left to the tc program */
	BACKEND_XDP_LEFT,         /* encapsulated, unflagged, but without payload (nothing for GRO to
				   * coalesce), of no connection here, or failing a check the tc program
				   * makes: left to the tc program */
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

/* Does a connection here (any socket but a listener: established, request, TIME_WAIT) own the segment?
 * The tc program passes an unflagged segment of such a socket as it is (pass_if_owned). */
static __always_inline int owned(struct xdp_md *ctx, const struct segment *seg)
{
	struct bpf_sock_tuple tuple = {};
	__u32 tuple_size = socket_tuple_of(&tuple, seg);

	struct bpf_sock *skc = bpf_skc_lookup_tcp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!skc)
		return 0;
	int listening = skc->state == BPF_TCP_LISTEN;
	bpf_sk_release(skc);
	return !listening;
}

/* A segment with payload, the tc program's checks for an unflagged segment from a front (synproxy_backend,
 * encap_mac_valid, forwarded_by_a_front), and a connection that owns it. Cheapest first: a bare segment
 * (GRO does not coalesce those) is left to the tc program at once, so an ACK flood costs this stage no
 * socket lookup (a random tuple meets the listener: a reuseport group's selection) and no MAC; the
 * lookup comes before the MAC, so a forged data segment is not MACed twice either. */
static __always_inline int decapsulable(struct xdp_md *ctx, const struct encap_header *header, __be32 outer_saddr,
					__be32 outer_daddr, const struct segment *seg)
{
	__u32 zero = 0;
	const struct encap_keys *keys = bpf_map_lookup_elem(&encap_keys, &zero);
	__u16 port = bpf_ntohs(seg->dport);
	union encap_message message;
	__u64 mac;
	int valid = 0;

	if (seg->ip_length + sizeof(struct ethhdr) <= seg->tcp_offset + seg->tcp_length ||
	    !keys || (seg->flags & TCP_FLAG_SYN) || !bpf_map_lookup_elem(&protected_vips, seg->daddr) ||
	    !bpf_map_lookup_elem(&protected_ports, &port) || !owned(ctx, seg))
		return 0;
	__builtin_memcpy(&mac, header->mac, 8);
	mac = bpf_be64_to_cpu(mac);
	encap_message_of(&message, outer_saddr, outer_daddr, seg, header->flags, &header->former);
#pragma unroll
	for (__u32 i = 0; i < MAX_SECRETS; i++) {
		if (i < keys->nkeys && encap_mac(&message, keys->keys[i]) == mac)
			valid = 1;
	}
	return valid;
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
	if (header->magic != ENCAP_MAGIC || header->version != ENCAP_VERSION || header->reserved ||
	    !bpf_map_lookup_elem(&trusted_fronts, front))
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
	if (parse_frame(inner_eth, data_end, &seg) != PARSE_SEGMENT ||
	    !decapsulable(ctx, &kept, outer_saddr, outer_daddr, &seg)) {
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
	return count(BACKEND_XDP_DECAPSULATED);
}

char LICENSE[] SEC("license") = "GPL";
