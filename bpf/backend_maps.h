// SPDX-License-Identifier: GPL-2.0
/* The maps the backend's tc program (bpf/backend.bpf.c) and its XDP stage (bpf/backend_xdp.bpf.c) share,
 * defined once, and the decisions both make from them and the header (the stage acts only where the tc
 * program would decide the same): the loader hands the XDP object the tc object's maps
 * (bpf_map__reuse_fd), and libbpf refuses a map whose layout differs. The loader's build cache hashes every header in bpf/, so an edit here
 * rebuilds both objects. */
#ifndef BACKEND_MAPS_H
#define BACKEND_MAPS_H

#include "synproxy.h"

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

/* The protected ports, host order (the front keeps its own array, protected_port_slots). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} protected_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* see struct encap_keys: updates must be atomic for readers */
	__uint(map_flags, BPF_F_NO_PREALLOC); /* as `salts`: no element reused under a reader */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct encap_keys);
} encap_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); /* per CPU: no atomics, no contention under a flood */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_bucket);
} reset_budget SEC(".maps");

/* The TIME_WAIT socket's fields both programs read (tcp_timewait_state_process's), CO-RE: libbpf relocates
 * them to the running kernel's offsets (the objects are built with -g). tw_rcv_nxt and tw_snd_nxt are
 * sock_common's skc_tw_rcv_nxt and skc_tw_snd_nxt, in anonymous unions. */
struct sock_common___x {
	__u32 skc_tw_rcv_nxt;
	__u32 skc_tw_snd_nxt;
} __attribute__((preserve_access_index));

struct inet_timewait_sock___x {
	struct sock_common___x __tw_common;
} __attribute__((preserve_access_index));

struct tcp_timewait_sock___x {
	struct inet_timewait_sock___x tw_sk;
	__u32 tw_ts_recent;
	int tw_ts_recent_stamp;
} __attribute__((preserve_access_index));

/* Who owns an unflagged segment here, from the socket the lookup found for its tuple (or none). */
enum flow_owner {
	FLOW_UNOWNED,   /* no socket, or only a listener */
	FLOW_OWNED,     /* a connection: established, request, or TIME_WAIT and the segment its connection's */
	FLOW_TIME_WAIT_PAST, /* a TIME_WAIT socket of an earlier connection of the tuple: the segment acknowledges
			      * what that connection never sent */
};

/* A TIME_WAIT socket owns the last segments of its connection: a retransmitted FIN, its ACK, a RST, which
 * acknowledge tw_snd_nxt (or one less: a FIN sent before ours was received), or carry no ACK. A segment
 * acknowledging anything else is of a later connection of the tuple that this backend never made (the
 * client's port met the TIME_WAIT socket of its earlier connection, and the new one's handshake ACK was
 * never validated: its cookie expired, or forged). Passed to the TIME_WAIT socket, it would be answered
 * with that socket's last ACK, its 60 s restarted, never a RST: the client, which believes it is
 * connected, would wait until its own timeout (tests/test_lab.py, two epochs old). It is no connection's
 * here. */
static __always_inline enum flow_owner flow_owner(struct bpf_sock *skc, const struct segment *seg)
{
	if (!skc || skc->state == BPF_TCP_LISTEN)
		return FLOW_UNOWNED;
	if (skc->state != BPF_TCP_TIME_WAIT || !(seg->flags & TCP_FLAG_ACK))
		return FLOW_OWNED;
	struct tcp_timewait_sock___x *tw = (void *)bpf_skc_to_tcp_timewait_sock(skc);
	if (!tw)
		return FLOW_OWNED;
	__u32 snd_nxt = tw->tw_sk.__tw_common.skc_tw_snd_nxt;

	return seg->ack == snd_nxt || seg->ack == snd_nxt - 1 ? FLOW_OWNED : FLOW_TIME_WAIT_PAST;
}

/* Did a front that holds one of our encap keys write this header for these outer addresses and this
 * inner segment? */
static __always_inline int encap_mac_valid(const struct encap_header *header, __be32 outer_saddr,
					   __be32 outer_daddr, const struct segment *seg)
{
	__u32 zero = 0;
	struct encap_keys *keys = bpf_map_lookup_elem(&encap_keys, &zero);
	union encap_message message;
	__u64 mac;

	if (!keys)
		return 0;
	__builtin_memcpy(&mac, header->mac, 8);
	mac = bpf_be64_to_cpu(mac);
	encap_message_of(&message, outer_saddr, outer_daddr, seg, header->flags, &header->former);
#pragma unroll
	for (__u32 i = 0; i < MAX_SECRETS; i++) {
		if (i < keys->nkeys && encap_mac(&message, keys->keys[i]) == mac)
			return 1;
	}
	return 0;
}

/* Where a backend (`self`, the outer destination) with no connection for this unflagged segment passes
 * it on (encap.next_owner): from a front's packet, to the first former owner named that is not itself;
 * from a chained one, when it is the previous owner, to the earlier. 0: this is the last hop. */
static __always_inline __be32 next_owner(const struct encap_header *header, __be32 self)
{
	const struct former_owners *former = &header->former;

	if (!(header->flags & ENCAP_FLAG_CHAINED)) {
		if (former->previous && former->previous != self)
			return former->previous;
	} else if (former->previous != self) {
		return 0;
	}
	return former->earlier != self ? former->earlier : 0;
}

/* May this CPU pass one more packet of no connection to the kernel, which answers it with a RST? Each
 * packet meets this once, in the first program that decides it: the XDP stage for the unflagged segments
 * it passes decapsulated (the tc program then sees plain TCP), the tc program for the rest. So RPS, which
 * runs the tc program on another CPU than the stage's, cannot make them disagree. */
static __always_inline int reset_allowed(const struct backend_config *cfg)
{
	__u32 zero = 0;

	return token_take(bpf_map_lookup_elem(&reset_budget, &zero), cfg->reset_cost_ns, cfg->reset_credit_ns);
}

#endif
