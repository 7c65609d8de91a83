// SPDX-License-Identifier: GPL-2.0
/* Backend data plane (tc ingress, direct action): remove the fronts' encapsulation, re-check the
 * cookie of VALIDATED ACKs, and let the kernel create the connection with bpf_sk_assign_tcp_reqsk.
 * docs/backend.md describes what it trusts; docs/cookie.md the cookie. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "synproxy.h"

/* The kernel's struct sock, only ever passed through. libbpf matches the kfunc's prototype against the
 * kernel's BTF kind by kind, and a forward declaration (FWD) would not match its STRUCT. */
struct sock {
	int opaque;
};

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct backend_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u8[16]); /* IPv4 as ::ffff:a.b.c.d */
	__type(value, __u8);
} trusted_fronts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, COOKIE_EPOCH_SLOTS);
	__type(key, __u32);
	__type(value, struct salt_slot);
} salts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KFUNC_ERRNO_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} kfunc_errors SEC(".maps");

static __always_inline void count(__u32 index, void *map)
{
	__u64 *value = bpf_map_lookup_elem(map, &index);

	if (value)
		*value += 1;
}
#define COUNT(index) count((index), &counters)

union cookie_message {
	__u8 bytes[COOKIE_MAC_INPUT_BYTES];
	__u64 words[COOKIE_MAC_INPUT_BYTES / 8];
};

/* Does `cookie` carry a valid MAC for this IPv4 flow? (docs/cookie.md, "Validation") */
static __always_inline int cookie_valid_v4(__u32 cookie, __u32 client_isn, const struct iphdr *ip,
					   const struct tcphdr *tcp)
{
	__u32 data = cookie & COOKIE_DATA_MASK;
	__u32 slot_index = (data >> COOKIE_EPOCH_SHIFT) & (COOKIE_EPOCH_SLOTS - 1);
	struct salt_slot *slot = bpf_map_lookup_elem(&salts, &slot_index);
	union cookie_message message = {};

	if (!slot || !slot->valid)
		return 0;
	message.bytes[10] = 0xff;
	message.bytes[11] = 0xff;
	__builtin_memcpy(&message.bytes[12], &ip->saddr, 4);
	message.bytes[26] = 0xff;
	message.bytes[27] = 0xff;
	__builtin_memcpy(&message.bytes[28], &ip->daddr, 4);
	__builtin_memcpy(&message.bytes[32], &tcp->source, 2);
	__builtin_memcpy(&message.bytes[34], &tcp->dest, 2);
	__u32 isn_be = bpf_htonl(client_isn);
	__u32 epoch_be = bpf_htonl((__u32)slot->epoch);
	__u16 data_be = bpf_htons((__u16)data);
	__builtin_memcpy(&message.bytes[36], &isn_be, 4);
	__builtin_memcpy(&message.bytes[40], &epoch_be, 4);
	__builtin_memcpy(&message.bytes[44], &data_be, 2);
#pragma unroll
	for (int i = 0; i < MAX_SECRETS; i++) {
		if (i < slot->nkeys &&
		    (siphash24_48(message.words, slot->keys[i]) & COOKIE_MAC_MASK) == cookie >> COOKIE_DATA_BITS)
			return 1;
	}
	return 0;
}

/* The ACK's own timestamp option, if any: TSval is the client's clock, TSecr the front's. Walks a
 * scalar offset with bpf_skb_load_bytes (packet-pointer walks defeat the verifier's pruning); a
 * timestamp after the 16th option is not looked for. */
#define MAX_OPTIONS_WALKED 16
static __always_inline int ack_timestamps(struct __sk_buff *skb, __u32 tcp_offset, __u32 tcp_length,
					  __u32 *tsval, __u32 *tsecr)
{
	__u32 offset = tcp_offset + sizeof(struct tcphdr);
	__u32 end = tcp_offset + tcp_length;
	__u8 option[10];

	for (int i = 0; i < MAX_OPTIONS_WALKED; i++) {
		if (offset >= end || offset > 0xffff)
			return 0;
		if (bpf_skb_load_bytes(skb, offset, option, 1))
			return 0;
		if (option[0] == 0)
			return 0;
		if (option[0] == 1) {
			offset += 1;
			continue;
		}
		if (offset + 2 > end || bpf_skb_load_bytes(skb, offset, option, 2) || option[1] < 2)
			return 0;
		if (option[0] == 8 && option[1] == 10) {
			if (offset + 10 > end || bpf_skb_load_bytes(skb, offset, option, 10))
				return 0;
			__builtin_memcpy(tsval, &option[2], 4);
			__builtin_memcpy(tsecr, &option[6], 4);
			*tsval = bpf_ntohl(*tsval);
			*tsecr = bpf_ntohl(*tsecr);
			return 1;
		}
		offset += option[1];
	}
	return 0;
}

/* A VALIDATED handshake ACK (already decapsulated): check the cookie, then create the connection. */
static __always_inline int create_connection_v4(struct __sk_buff *skb, const struct backend_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;

	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
		return TC_ACT_OK;
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end || !tcp->ack || tcp->syn || tcp->rst || tcp->fin)
		return TC_ACT_OK;

	__u32 cookie = bpf_ntohl(tcp->ack_seq) - 1;
	if (!cookie_valid_v4(cookie, bpf_ntohl(tcp->seq) - 1, ip, tcp)) {
		COUNT(COUNTER_COOKIE_BAD);
		return TC_ACT_SHOT;
	}

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;
	struct bpf_sock *skc = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!skc) {
		COUNT(COUNTER_NO_SOCKET);
		return TC_ACT_OK;
	}
	if (skc->state != BPF_TCP_LISTEN) {
		COUNT(COUNTER_NOT_LISTENER);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}
	struct tcp_sock *listener = bpf_skc_to_tcp_sock(skc);
	if (!listener) {
		COUNT(COUNTER_NOT_LISTENER);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}

	__u32 data_bits = cookie & COOKIE_DATA_MASK;
	__u32 wscale = (data_bits >> COOKIE_WSCALE_SHIFT) & 0xf;
	struct bpf_tcp_req_attrs attrs = {};
	attrs.mss = mss_table_v4[data_bits & COOKIE_MSS_MASK];
	if (wscale != COOKIE_WSCALE_NONE) {
		attrs.wscale_ok = 1;
		attrs.snd_wscale = wscale;
		attrs.rcv_wscale = cfg->server_wscale;
	}
	attrs.sack_ok = !!(data_bits & COOKIE_SACK_BIT);
	attrs.ecn_ok = !!(data_bits & COOKIE_ECN_BIT);
	if (ack_timestamps(skb, sizeof(struct ethhdr) + sizeof(struct iphdr), tcp->doff * 4, &attrs.rcv_tsval,
			   &attrs.rcv_tsecr))
		attrs.tstamp_ok = 1;

	int err = bpf_sk_assign_tcp_reqsk(skb, (struct sock *)listener, &attrs, sizeof(attrs));
	bpf_sk_release(skc);
	if (err) {
		__u32 slot = -err < KFUNC_ERRNO_SLOTS ? -err : KFUNC_ERRNO_SLOTS - 1;
		COUNT(COUNTER_KFUNC_FAILED);
		count(slot, &kfunc_errors);
		return TC_ACT_OK;
	}
	COUNT(COUNTER_CREATED);
	return TC_ACT_OK;
}

static __always_inline void count_syn(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip + 1);

	if ((void *)(tcp + 1) <= data_end && ip->protocol == IPPROTO_TCP && ip->ihl == 5 && tcp->syn &&
	    !tcp->ack)
		COUNT(COUNTER_SYN_RECEIVED);
}

SEC("tc")
int synproxy_backend(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct encap_header *header = (void *)(udp + 1);
	__u32 zero = 0;
	struct backend_config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg || (void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		COUNT(COUNTER_PASSED);
		return TC_ACT_OK;
	}
	if (ip->protocol != IPPROTO_UDP || ip->ihl != 5 || (void *)(udp + 1) > data_end ||
	    udp->dest != bpf_htons(cfg->encap_port) || (ip->frag_off & bpf_htons(0x3fff))) {
		count_syn(skb);
		COUNT(COUNTER_PASSED);
		return TC_ACT_OK;
	}

	__u8 front[16] = {};
	front[10] = 0xff;
	front[11] = 0xff;
	__builtin_memcpy(&front[12], &ip->saddr, 4);
	if (!bpf_map_lookup_elem(&trusted_fronts, front)) {
		COUNT(COUNTER_UNTRUSTED);
		return TC_ACT_SHOT;
	}
	if ((void *)(header + 1) + 1 > data_end || header->magic != ENCAP_MAGIC || header->reserved) {
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	__u8 flags = header->flags;
	__u8 inner_version = *(__u8 *)(header + 1) >> 4;
	if (inner_version != 4) {
		COUNT(inner_version == 6 ? COUNTER_UNSUPPORTED : COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_adjust_room(skb, -ENCAP_OVERHEAD, BPF_ADJ_ROOM_MAC, 0)) {
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	COUNT(COUNTER_DECAPSULATED);
	count_syn(skb);
	if (flags & ENCAP_FLAG_VALIDATED)
		return create_connection_v4(skb, cfg);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
