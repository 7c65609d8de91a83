// SPDX-License-Identifier: GPL-2.0
/* A minimal forwarder, the anchor of benchmarks/front_xdp_cost.py: what any XDP program of the front's
 * shape pays on this machine before its own decisions. It parses Ethernet, IPv4 (no options) and TCP,
 * looks its one target up in an array map, grows the head by the encapsulation's size, writes the outer
 * Ethernet, IPv4, UDP and encapsulation headers (the front's layout, bpf/synproxy.h) and sends the frame
 * back out (XDP_TX). No flow hash, no Maglev table, no cookie, no MAC (zero): the front's work above this
 * is its own. Everything else is passed. Not a data plane: nothing attaches it but benchmarks. */
#include "synproxy.h"

#include <linux/udp.h>

/* Where every packet goes: one backend, one next hop, one UDP source port. */
struct min_forward_target {
	__be32 farm_address;
	__be32 backend;
	__be16 encap_port;
	__be16 source_port;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct min_forward_target);
} min_forward_target SEC(".maps");

SEC("xdp")
int xdp_min_forward(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	__u32 zero = 0;

	if ((void *)(tcp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	const struct min_forward_target *target = bpf_map_lookup_elem(&min_forward_target, &zero);
	if (!target)
		return XDP_PASS;
	__u16 ip_length = bpf_ntohs(ip->tot_len);

	if (bpf_xdp_adjust_head(ctx, -ENCAP_OVERHEAD))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct encap_header *header = (void *)(udp + 1);
	if ((void *)(header + 1) > data_end)
		return XDP_DROP;

	__builtin_memcpy(eth->h_dest, target->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, target->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	*outer = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(ENCAP_OVERHEAD + ip_length),
		.frag_off = bpf_htons(0x4000), /* DF */
		.ttl = 64,
		.protocol = IPPROTO_UDP,
		.saddr = target->farm_address,
		.daddr = target->backend,
	};
	outer->check = ipv4_header_fold(outer);
	udp->source = target->source_port;
	udp->dest = target->encap_port;
	udp->len = bpf_htons(ENCAP_OVERHEAD - sizeof(struct iphdr) + ip_length);
	udp->check = 0;
	*header = (struct encap_header){.magic = ENCAP_MAGIC, .version = ENCAP_VERSION};
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
