// SPDX-License-Identifier: GPL-2.0
/* Backend data plane (tc ingress, direct action): authenticate and remove the fronts' encapsulation,
 * re-check the cookie of VALIDATED ACKs, and let the kernel create the connection with
 * bpf_sk_assign_tcp_reqsk; pass a segment no connection here owns, or an ICMP error about such a flow,
 * on to the flow's former owners (Beamer's daisy chain). docs/backend.md describes what it trusts;
 * docs/cookie.md the cookie. Outer IPv4; inner IPv4 or IPv6. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "synproxy.h"
#include "backend_maps.h"

#define AF_INET 2
#define EALREADY 114
#define ENCAP_TTL 64
#define IP_DF 0x4000
#define LOOPBACK_IFINDEX 1 /* the loopback device's in every network namespace (include/net/flow.h) */

/* The kernel's struct sock, only ever passed through. libbpf matches the kfunc's prototype against the
 * kernel's BTF kind by kind, and a forward declaration (FWD) would not match its STRUCT. */
struct sock {
	int opaque;
};

/* The fields of the kernel's struct sock this program reads, at the offsets the running kernel's BTF
 * gives (CO-RE: libbpf relocates them; the object is built with -g). */
struct sock___x {
	__u32 sk_ack_backlog;
	__u32 sk_max_ack_backlog;
} __attribute__((preserve_access_index));

/* The request socket's fields a recycle reads (struct tcp_request_sock), CO-RE like sock___x: rcv_nxt, the
 * client's ISN + 1; ts_recent (request_sock's), the TSval of the SYN that made it, or 0. */
struct request_sock___x {
	__u32 ts_recent;
} __attribute__((preserve_access_index));

struct inet_request_sock___x {
	struct request_sock___x req;
} __attribute__((preserve_access_index));

struct tcp_request_sock___x {
	struct inet_request_sock___x req;
	__u32 rcv_nxt;
} __attribute__((preserve_access_index));

/* A connection's fields (struct tcp_sock) that tell its own segments from another connection's on the tuple
 * (segment_of_connection) and what its RST carries (victim_of), CO-RE like sock___x. */
struct tcp_sock___x {
	__u32 rcv_nxt;
	__u32 snd_nxt;
	__u32 snd_una;
	__u32 rcv_wnd;
	__u32 max_window;
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

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

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024); /* 640 events of the largest packet, ~5000 of a small request */
} time_wait SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); /* where an event is written: too large for the stack */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct time_wait_event);
} time_wait_scratch SEC(".maps");

/* What the encapsulation said, kept past decapsulate() (which moves the packet). */
struct arrival {
	struct encap_header header;
	__be32 front;       /* the outer source: a front (or a backend passing it on) */
	__be32 self;        /* the outer destination: this backend's farm address */
	__be16 source_port; /* the front's flow-hash port, kept along the chain */
};

/* A new connection whose tuple's TIME_WAIT or request socket is being recycled in the kernel (recycle),
 * named by its tuple and its segments' sequence number (the client's ISN + 1, which every validated
 * segment of it carries: the ACK and the data right behind it; a client reconnecting from the same port
 * within the window has another). Its state word RECYCLE_STATE packs when the recycle began (µs), whether
 * it fell back to the loader, and the IP length of the segment that began it (the owner: its re-queued
 * copy makes the connection). One 64-bit word, so a claim is one compare-and-swap. Beside it what the
 * owner's re-queued copy, decapsulated, no longer carries (recycle_owner_again): its ack (the cookie + 1)
 * and its encapsulation, which the loader's fallback puts back. LRU: entries are young for
 * RECYCLE_WINDOW_US only, never deleted. */
struct recycle_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 seq;
};

struct recycle {
	__u64 state;
	__u32 owner_ack;
	struct arrival owner_arrival;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct recycle_key);
	__type(value, struct recycle);
} time_wait_recycling SEC(".maps");

static __always_inline void count_in(void *map, __u32 index)
{
	__u64 *value = bpf_map_lookup_elem(map, &index);

	if (value)
		*value += 1;
}
#define COUNT(index) count_in(&counters, (index))

/* Where the segment's timestamp option starts (its kind byte), or 0 when it has none. Walks a scalar offset
 * with bpf_skb_load_bytes (packet-pointer walks defeat the verifier's pruning); 40 bytes of options hold
 * at most 40 options, so the bound never cuts a real header short. */
static __always_inline __u32 timestamp_option(struct __sk_buff *skb, const struct segment *seg)
{
	__u32 offset = seg->tcp_offset + sizeof(struct tcphdr);
	__u32 end = seg->tcp_offset + seg->tcp_length;
	__u8 option[2];

	for (int i = 0; i < MAX_OPTIONS_WALKED; i++) {
		if (offset >= end || offset > 0xffff)
			return 0;
		if (bpf_skb_load_bytes(skb, offset, option, 1) || option[0] == TCPOPT_EOL)
			return 0;
		if (option[0] == TCPOPT_NOP) {
			offset += 1;
			continue;
		}
		if (offset + 2 > end || bpf_skb_load_bytes(skb, offset, option, 2) || option[1] < 2)
			return 0;
		if (option[0] == TCPOPT_TIMESTAMP && option[1] == TCPOLEN_TIMESTAMP)
			return offset + TCPOLEN_TIMESTAMP <= end ? offset : 0;
		offset += option[1];
	}
	return 0;
}

/* The ACK's own timestamp option, if any: TSval is the client's clock, TSecr the front's. */
static __always_inline int ack_timestamps(struct __sk_buff *skb, const struct segment *seg,
					  __u32 *tsval, __u32 *tsecr)
{
	__u32 offset = timestamp_option(skb, seg);
	__be32 values[2];

	if (!offset || bpf_skb_load_bytes(skb, offset + 2, values, sizeof(values)))
		return 0;
	*tsval = bpf_ntohl(values[0]);
	*tsecr = bpf_ntohl(values[1]);
	return 1;
}

/* Would the kernel drop the connection for a full accept queue (sk_acceptq_is_full)? It would create it
 * and drop it, silently for the client, who believes it is connected; passed instead, the ACK meets the
 * listener, whose own cookie check fails, and the listener answers it with a RST (docs/backend.md). Each
 * CPU may hold connections between this check and the queue (no lock): NAPI's list receive (a NIC, or a
 * veth with the XDP stage attached) hands up to RECEIVE_BATCH packets through this program before any
 * reaches TCP, so each CPU may hold that many, this one that many less one. That margin, up to half the
 * backlog, keeps them from filling it behind this check. */
#define RECEIVE_BATCH 8 /* net.core.gro_normal_batch's default */
static __always_inline int accept_queue_full(const struct sock___x *listener, const struct backend_config *cfg)
{
	__u32 backlog = listener->sk_ack_backlog, max_backlog = listener->sk_max_ack_backlog;
	__u32 margin = cfg->cpus ? cfg->cpus * RECEIVE_BATCH - 1 : 0;

	if (margin > max_backlog / 2)
		margin = max_backlog / 2;
	return backlog + margin > max_backlog;
}

/* The request-socket attributes the cookie's data bits and the ACK's timestamps describe. */
static __always_inline void fill_attrs(struct __sk_buff *skb, const struct segment *seg, __u32 data,
				       const struct backend_config *cfg, struct bpf_tcp_req_attrs *attrs)
{
	__u32 wscale = (data >> COOKIE_WSCALE_SHIFT) & 0xf;

	attrs->mss = seg->family == 4 ? mss_table_v4[data & COOKIE_MSS_MASK]
				      : mss_table_v6[data & COOKIE_MSS_MASK];
	if (wscale != COOKIE_WSCALE_NONE) {
		attrs->wscale_ok = 1;
		attrs->snd_wscale = wscale;
		attrs->rcv_wscale = cfg->server_wscale;
	}
	attrs->sack_ok = !!(data & COOKIE_SACK_BIT);
	attrs->ecn_ok = !!(data & COOKIE_ECN_BIT);
	attrs->tstamp_ok = ack_timestamps(skb, seg, &attrs->rcv_tsval, &attrs->rcv_tsecr);
}

/* Would the kernel's TIME_WAIT socket let a SYN recycle it (RFC 6191, as tcp_timewait_state_process
 * decides)? The SYN's ISN is the ACK's seq - 1; its TSval is taken from the ACK (the client's clock, no
 * older than the SYN's). With timestamps on both connections (the old one: tw_ts_recent_stamp set), a
 * TSval older than tw_ts_recent is refused (PAWS) and a newer one accepted; otherwise the ISN must lie
 * after the old connection's tw_rcv_nxt. */
static __always_inline int rfc6191_accepts(struct __sk_buff *skb, const struct segment *seg, struct bpf_sock *skc)
{
	struct tcp_timewait_sock___x *tw = (void *)bpf_skc_to_tcp_timewait_sock(skc);
	__u32 tsval = 0, tsecr = 0;

	if (!tw)
		return 0;
	if (tw->tw_ts_recent_stamp && ack_timestamps(skb, seg, &tsval, &tsecr)) {
		__s32 age = (__s32)(tw->tw_ts_recent - tsval);

		if (age > 0)
			return 0;
		if (age < 0)
			return 1;
	}
	return (__s32)(seg->seq - 1 - tw->tw_sk.__tw_common.skc_tw_rcv_nxt) > 0;
}

/* Tell the loader, through the ring buffer, that this validated segment met a TIME_WAIT socket RFC 6191
 * accepts (or a stale request socket), and drop it: the loader destroys the socket (sock_diag SOCK_DESTROY) and re-injects the segment,
 * encapsulated again, on the loopback device, where this program meets it once more and makes the
 * connection. The event carries the inner packet for that (and what the outer headers held), unless it is
 * larger than TIME_WAIT_PACKET_MAX: the client's retransmission then makes the connection. The fallback
 * of recycle (docs/backend.md). */
static __always_inline int report_time_wait(struct __sk_buff *skb, const struct segment *seg,
					    const struct arrival *arrival, const struct backend_config *cfg)
{
	__u32 zero = 0, length = seg->ip_length;
	struct time_wait_event *event = bpf_map_lookup_elem(&time_wait_scratch, &zero);

	if (!event) {
		COUNT(COUNTER_TIME_WAIT_UNREPORTED);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(event->saddr, seg->saddr, 16);
	__builtin_memcpy(event->daddr, seg->daddr, 16);
	event->sport = seg->sport;
	event->dport = seg->dport;
	event->seq = seg->seq;
	event->ack = seg->ack;
	event->family = seg->family;
	event->reinjected = skb->ingress_ifindex == LOOPBACK_IFINDEX;
	event->front = arrival->front;
	event->backend = arrival->self;
	event->source_port = arrival->source_port;
	event->encap_port = bpf_htons(cfg->encap_port);
	event->header = arrival->header;
	if (length == 0 || length > TIME_WAIT_PACKET_MAX ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), event->packet, length))
		length = 0;
	event->length = length;
	if (bpf_ringbuf_output(&time_wait, event, __builtin_offsetof(struct time_wait_event, packet) + length, 0))
		COUNT(COUNTER_TIME_WAIT_UNREPORTED);
	return TC_ACT_SHOT;
}

/* The outer IPv4 + UDP + header in front of an inner packet of `ip_length` bytes, as a front writes them
 * (encap.encapsulate): from `saddr` to `daddr`, the front's flow-hash `source_port`, `header` as given. */
struct outer_headers {
	struct iphdr ip;
	struct udphdr udp;
	struct encap_header header;
};
_Static_assert(sizeof(struct outer_headers) == ENCAP_OVERHEAD, "outer IPv4 + UDP + header");

/* Put `outer` (outer_headers) in front of the inner packet; with `grow_flags` the grow also marks the
 * packet encapsulated for offloads, or plainly when a grow before left it marked (-EALREADY: veth and
 * forwarding keep skb->encapsulation). 0, or -1 when the packet could not be grown or written. */
static __always_inline int encapsulate(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __be16 source_port,
				       const struct encap_header *header, __u16 ip_length,
				       const struct backend_config *cfg, __u64 grow_flags)
{
	struct outer_headers outer = {};
	__be16 ip_type = bpf_htons(ETH_P_IP);

	outer.ip.version = 4;
	outer.ip.ihl = 5;
	outer.ip.tot_len = bpf_htons(ENCAP_OVERHEAD + ip_length);
	outer.ip.frag_off = bpf_htons(IP_DF);
	outer.ip.ttl = ENCAP_TTL;
	outer.ip.protocol = IPPROTO_UDP;
	outer.ip.saddr = saddr;
	outer.ip.daddr = daddr;
	outer.ip.check = ipv4_header_fold(&outer.ip);
	outer.udp.source = source_port;
	outer.udp.dest = bpf_htons(cfg->encap_port);
	outer.udp.len = bpf_htons(ENCAP_OVERHEAD - sizeof(struct iphdr) + ip_length);
	outer.header = *header;

	long grown = bpf_skb_adjust_room(skb, ENCAP_OVERHEAD, BPF_ADJ_ROOM_MAC, grow_flags);
	if (grown == -EALREADY && grow_flags)
		grown = bpf_skb_adjust_room(skb, ENCAP_OVERHEAD, BPF_ADJ_ROOM_MAC, 0);
	if (grown || bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_proto), &ip_type, 2, 0) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &outer, sizeof(outer), 0))
		return -1;
	return 0;
}

/* Put the encapsulation back as it arrived (the front's addresses, ports and header, its MAC included) and
 * queue the segment again at this interface's ingress: it passes every check once more, behind what this
 * CPU queued before it (netif_rx: the CPU's backlog, in order). A plain grow: the segment was received, it
 * needs no offload. */
static __always_inline int queue_again(struct __sk_buff *skb, const struct segment *seg, const struct arrival *arrival,
				       const struct backend_config *cfg)
{
	/* The outer lengths count what the segment carries, as chain_to's: with its own length field a frame
	 * carrying more (which the MAC does not cover) would fail outer_ipv4_sound on its next run. */
	if (encapsulate(skb, arrival->front, arrival->self, arrival->source_port, &arrival->header,
			skb->len - sizeof(struct ethhdr), cfg, 0)) {
		COUNT(COUNTER_TIME_WAIT_UNREPORTED);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* The socket a new connection's validated segment met on its tuple, and what the RST that kills it carries
 * (send_assassination): the sequence number the socket expects; with `set_timestamps`, TSval `tsval` and
 * TSecr 0 in place of the segment's, if the segment has a timestamp option. */
struct victim {
	__u32 rcv_nxt;
	__u32 tsval;
	int set_timestamps;
};

/* Rewrite the 4 bytes at `at` from `from` to `to`, the TCP checksum at `csum_at` with them. */
static __always_inline long rewrite_word(struct __sk_buff *skb, __u32 at, __u32 csum_at, __be32 from, __be32 to)
{
	if (bpf_skb_store_bytes(skb, at, &to, 4, 0))
		return -1;
	return bpf_l4_csum_replace(skb, csum_at, from, to, 4);
}

/* Send, to this interface's ingress, a copy of the segment made the RST that kills the victim: its
 * sequence number the victim's rcv_nxt, its flags RST alone. A TIME_WAIT socket: tcp_timewait_state_process
 * takes an in-window RST as "TIME-WAIT assassination", fatal while net.ipv4.tcp_rfc1337 is 0; the RST may
 * carry the segment's payload and options, which the kernel ignores there, and its timestamp, no older
 * than the socket's, passes PAWS. A request socket: tcp_check_req drops the request for a RST at rcv_nxt
 * without ACK (one with an ACK not of its own SYN-ACK would go to the listener), after two timestamp
 * checks it applies to a RST too: PAWS, passed by the request's ts_recent as TSval (the new connection's
 * TSval may be older), and a TSecr not 0 must lie among the TSvals of its SYN-ACKs (the segment's echoes
 * the front's), skipped for a TSecr of 0. The segment itself is restored. 0, or the clone's error. */
static __always_inline long send_assassination(struct __sk_buff *skb, const struct segment *seg,
					       const struct victim *victim)
{
	__u32 seq_at = seg->tcp_offset + 4, flags_at = seg->tcp_offset + 12, csum_at = seg->tcp_offset + 16;
	__u32 tsval_at = victim->set_timestamps ? timestamp_option(skb, seg) : 0;
	__be32 seq = bpf_htonl(seg->seq), rst_seq = bpf_htonl(victim->rcv_nxt);
	__be32 timestamps[2] = {}, rst_tsval = bpf_htonl(victim->tsval);
	__be16 word, rst_word; /* data offset and flags */
	long sent;

	if (tsval_at) {
		tsval_at += 2; /* past kind and length */
		if (bpf_skb_load_bytes(skb, tsval_at, timestamps, sizeof(timestamps)) ||
		    rewrite_word(skb, tsval_at, csum_at, timestamps[0], rst_tsval) ||
		    rewrite_word(skb, tsval_at + 4, csum_at, timestamps[1], 0))
			return -1;
	}
	if (bpf_skb_load_bytes(skb, flags_at, &word, 2))
		return -1;
	rst_word = (word & bpf_htons(0xff00)) | bpf_htons(TCP_FLAG_RST);
	if (rewrite_word(skb, seq_at, csum_at, seq, rst_seq) ||
	    bpf_skb_store_bytes(skb, flags_at, &rst_word, 2, 0) || bpf_l4_csum_replace(skb, csum_at, word, rst_word, 2))
		return -1;
	sent = bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS);
	if (rewrite_word(skb, seq_at, csum_at, rst_seq, seq) ||
	    bpf_skb_store_bytes(skb, flags_at, &word, 2, 0) || bpf_l4_csum_replace(skb, csum_at, rst_word, word, 2) ||
	    (tsval_at && (rewrite_word(skb, tsval_at, csum_at, rst_tsval, timestamps[0]) ||
			  rewrite_word(skb, tsval_at + 4, csum_at, 0, timestamps[1]))))
		return -1;
	return sent;
}

#define RECYCLE_WINDOW_US 2000 /* how long a recycle may take before the tuple is left to itself again */
#define RECYCLE_FALLBACK (1ULL << 16)
#define RECYCLE_STATE(since_us, length) ((since_us) << 17 | (length))
#define RECYCLE_OWNER_LENGTH(state) ((state) & 0xffff)

static __always_inline void recycle_key_of(struct recycle_key *key, const struct segment *seg)
{
	__builtin_memcpy(key->saddr, seg->saddr, 16);
	__builtin_memcpy(key->daddr, seg->daddr, 16);
	key->sport = seg->sport;
	key->dport = seg->dport;
	key->seq = seg->seq;
}

/* The connection's recycle if one is under way (begun less than RECYCLE_WINDOW_US ago), else none. */
static __always_inline struct recycle *recycle_under_way(const struct segment *seg, __u64 now_us)
{
	struct recycle_key key;
	struct recycle *recycling;

	recycle_key_of(&key, seg);
	recycling = bpf_map_lookup_elem(&time_wait_recycling, &key);
	if (!recycling || now_us - (recycling->state >> 17) >= RECYCLE_WINDOW_US)
		return 0;
	return recycling;
}

/* Begin the connection's recycle, owned by this segment: 0 when another of its segments just began it. */
static __always_inline int recycle_claimed(const struct segment *seg, const struct arrival *arrival, __u64 now_us)
{
	struct recycle_key key;
	struct recycle claim = {.state = RECYCLE_STATE(now_us, seg->ip_length), .owner_ack = seg->ack,
				.owner_arrival = *arrival}, *recycling;

	recycle_key_of(&key, seg);
	recycling = bpf_map_lookup_elem(&time_wait_recycling, &key);
	if (!recycling)
		return bpf_map_update_elem(&time_wait_recycling, &key, &claim, BPF_NOEXIST) == 0;
	__u64 old = recycling->state;
	if (now_us - (old >> 17) < RECYCLE_WINDOW_US ||
	    __sync_val_compare_and_swap(&recycling->state, old, claim.state) != old)
		return 0;
	recycling->owner_ack = claim.owner_ack; /* read only by this owner's copy, queued after */
	recycling->owner_arrival = claim.owner_arrival;
	return 1;
}

/* The mark of the owner's copy queued behind the RST (queue_owner_again): skb->mark is host-local (a packet
 * from another namespace arrives with it cleared, skb_scrub_packet), so only a program or a privileged process
 * of this host can set it, and recycle_owner_again accepts it only as the owner of a recycle under way. */
#define RECYCLE_OWNER_MARK 0x52435943 /* "RCYC" */

/* Queue the owner again at this interface's ingress, behind its RST on this CPU's backlog, decapsulated and
 * marked: its encapsulation and cookie were checked in this run, so its next run (recycle_owner_again) only
 * looks its socket up, instead of growing the packet here and stripping it and checking two MACs there. */
static __always_inline int queue_owner_again(struct __sk_buff *skb)
{
	skb->mark = RECYCLE_OWNER_MARK;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* What kills the socket a validated segment met (a TIME_WAIT or request socket, or another connection of the
 * tuple: a RST at its rcv_nxt, which tcp_validate_incoming takes whatever its timestamp): 0 when it is gone
 * meanwhile. */
static __always_inline int victim_of(struct bpf_sock *skc, struct victim *victim)
{
	if (skc->state == BPF_TCP_TIME_WAIT) {
		struct tcp_timewait_sock___x *tw = (void *)bpf_skc_to_tcp_timewait_sock(skc);

		if (!tw)
			return 0;
		victim->rcv_nxt = tw->tw_sk.__tw_common.skc_tw_rcv_nxt;
		return 1;
	}
	if (skc->state != BPF_TCP_NEW_SYN_RECV) {
		struct tcp_sock___x *connection = (void *)bpf_skc_to_tcp_sock(skc);

		if (!connection)
			return 0;
		victim->rcv_nxt = connection->rcv_nxt;
		return 1;
	}
	struct tcp_request_sock___x *request = (void *)bpf_skc_to_tcp_request_sock(skc);

	if (!request)
		return 0;
	victim->rcv_nxt = request->rcv_nxt;
	victim->tsval = request->req.req.ts_recent;
	victim->set_timestamps = 1;
	return 1;
}

/* Is a validated segment that met `skc`, a connection of its tuple, that connection's? Its handshake ACK again,
 * or the request right behind it: the ack is the connection's first byte (its ISN, the cookie, + 1: what it
 * has acknowledged since is bytes_acked). Or a segment the connection accepts anyway, its ack within what the
 * connection sent or its seq within its window (a later segment whose ack - 1 passed for a cookie: the cookie's
 * MAC is 22 bits). Anything else is a new connection's, from a client that reused its port while this backend
 * kept an earlier connection of it that the client has forgotten (its side reset, or made where this program
 * was not running): delivered to that socket, the new connection would hang until the old one dies. */
static __always_inline int segment_of_connection(struct bpf_sock *skc, const struct segment *seg)
{
	struct tcp_sock___x *connection = (void *)bpf_skc_to_tcp_sock(skc);

	if (!connection)
		return 1;
	__u32 snd_una = connection->snd_una, rcv_nxt = connection->rcv_nxt;
	__u32 sent_back = connection->max_window + 0x10000, window = connection->rcv_wnd + 0x10000;

	return seg->ack == snd_una - (__u32)connection->bytes_acked ||
	       seg->ack - (snd_una - sent_back) <= connection->snd_nxt - (snd_una - sent_back) ||
	       seg->seq - (rcv_nxt - window) <= 2 * window;
}

/* A segment of a connection whose recycle is under way met the socket again: the owner's RST did not kill it
 * (net.ipv4.tcp_rfc1337=1, a RST lost), or the recycle fell back already. Reported to the loader, the owner's
 * first: the loader keeps their order. */
static __always_inline int recycle_fallen_back(struct __sk_buff *skb, const struct segment *seg,
					       const struct arrival *arrival, struct recycle *recycling,
					       const struct backend_config *cfg)
{
	int verdict = report_time_wait(skb, seg, arrival, cfg);

	__sync_fetch_and_or(&recycling->state, RECYCLE_FALLBACK); /* after the owner's report */
	return verdict;
}

/* A validated segment met a TIME_WAIT socket or a request socket of its tuple. The kfunc's connection
 * cannot be inserted next to either (inet_ehash_insert finds the duplicate), and tc cannot remove them.
 * The kernel recycles a TIME_WAIT socket for a SYN RFC 6191 accepts; what RFC 6191 refuses is passed to
 * the TIME_WAIT socket, as the kernel would pass the SYN. A request socket is one a SYN that reached this
 * backend directly made (fronts put in front of a server already serving, a bypass), still sending
 * SYN-ACKs of its own ISN after its client gave up; the client's RSTs to them may have been lost (the
 * route moving to the fronts). The segment proves that the client's socket for the tuple is the
 * cookie's connection now (it acknowledges the cookie), so the request is stale: passed, it would meet
 * tcp_check_req, which hands an ACK of another ISN to the listener, and the listener answers it with a
 * RST. Both are recycled alike: the first segment of the new connection to get here (the owner) sends
 * the socket its RST (send_assassination) and is queued again behind it on this CPU, so the RST is
 * processed first and the owner then meets the listener and makes the connection. Another of its segments
 * meanwhile (the data right behind the ACK, on another CPU) is queued again until that connection exists
 * (recycle_waits), so it never makes a second one. The owner meeting the socket again means the RST did
 * not kill it (a TIME_WAIT socket under net.ipv4.tcp_rfc1337=1, a RST lost): the recycle falls back to
 * the loader (report_time_wait), the connection's other segments too. docs/backend.md, "4-tuple reuse". */
static __always_inline int recycle(struct __sk_buff *skb, const struct segment *seg, struct bpf_sock *skc,
				   const struct arrival *arrival, const struct backend_config *cfg)
{
	__u32 recycled = skc->state == BPF_TCP_TIME_WAIT ? COUNTER_TIME_WAIT_RECYCLED :
			 skc->state == BPF_TCP_NEW_SYN_RECV ? COUNTER_REQUEST_RECYCLED : COUNTER_CONNECTION_RECYCLED;
	__u64 now_us = bpf_ktime_get_ns() / 1000;
	struct recycle *recycling;
	struct victim victim = {};

	if (skc->state == BPF_TCP_TIME_WAIT && !rfc6191_accepts(skb, seg, skc)) {
		COUNT(COUNTER_TIME_WAIT_REFUSED);
		return TC_ACT_OK;
	}
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX) { /* the loader re-injected it: not again */
		COUNT(recycled);
		return report_time_wait(skb, seg, arrival, cfg);
	}
	recycling = recycle_under_way(seg, now_us);
	if (recycling) {
		if (!(recycling->state & RECYCLE_FALLBACK) && RECYCLE_OWNER_LENGTH(recycling->state) != seg->ip_length)
			return queue_again(skb, seg, arrival, cfg); /* the owner's RST is on its way */
		return recycle_fallen_back(skb, seg, arrival, recycling, cfg);
	}
	if (!recycle_claimed(seg, arrival, now_us))
		return queue_again(skb, seg, arrival, cfg);
	COUNT(recycled);
	if (!victim_of(skc, &victim) || send_assassination(skb, seg, &victim)) {
		recycling = recycle_under_way(seg, now_us);
		if (recycling)
			__sync_fetch_and_or(&recycling->state, RECYCLE_FALLBACK);
		return report_time_wait(skb, seg, arrival, cfg);
	}
	return queue_owner_again(skb);
}

/* Must this validated segment, which met the listener, wait? Yes while its connection's recycle is under way in
 * the kernel and it is not the owner: the owner's connection is about to be made (it is queued behind the
 * RST that just ended the TIME_WAIT socket), and a second connection made from this segment on another
 * CPU would race it, the loser dropped by inet_ehash_insert (a request right behind the ACK then waits
 * for the client's retransmission, 200 ms). Segments the loader re-injects never wait: they come one at a
 * time from its thread. The owner's state is returned through `owned`, so a failure can end the wait. */
static __always_inline int recycle_waits(struct __sk_buff *skb, const struct segment *seg, struct recycle **owned)
{
	struct recycle *recycling;

	*owned = 0;
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return 0;
	recycling = recycle_under_way(seg, bpf_ktime_get_ns() / 1000);
	if (!recycling || (recycling->state & RECYCLE_FALLBACK))
		return 0;
	if (RECYCLE_OWNER_LENGTH(recycling->state) != seg->ip_length)
		return 1;
	*owned = recycling;
	return 0;
}

/* The owner could not make the connection (a full accept queue, a refusing kfunc): let the connection's other
 * segments stop waiting for it. */
static __always_inline void recycle_abandoned(struct recycle *owned)
{
	if (owned)
		owned->state = 0;
}

/* The socket the kernel would deliver this segment to (established, request, time-wait or listener), or
 * none; the caller releases it (bpf_sk_release) on every path. */
static __always_inline struct bpf_sock *socket_of(struct __sk_buff *skb, const struct segment *seg)
{
	struct bpf_sock_tuple tuple = {};
	__u32 tuple_size = socket_tuple_of(&tuple, seg);

	return bpf_skc_lookup_tcp(skb, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
}

/* Have the kernel create the connection of a validated segment whose cookie is `cookie` at `skc`, the
 * listener its tuple met (released here); `owned`, the recycle this segment owns, if any, is ended when it
 * cannot. */
static __always_inline int connect_at_listener(struct __sk_buff *skb, const struct segment *seg, struct bpf_sock *skc,
					       __u32 cookie, struct recycle *owned, const struct backend_config *cfg)
{
	struct tcp_sock *listener = bpf_skc_to_tcp_sock(skc);

	if (!listener) {
		COUNT(COUNTER_NOT_LISTENER);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}
	if (accept_queue_full((void *)listener, cfg)) {
		COUNT(COUNTER_LISTEN_OVERFLOW);
		recycle_abandoned(owned);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}

	struct bpf_tcp_req_attrs attrs = {};
	fill_attrs(skb, seg, cookie & COOKIE_DATA_MASK, cfg, &attrs);
	int err = bpf_sk_assign_tcp_reqsk(skb, (struct sock *)listener, &attrs, sizeof(attrs));
	bpf_sk_release(skc);
	if (err) {
		__u32 errno_slot = -err;

		recycle_abandoned(owned);
		COUNT(COUNTER_KFUNC_FAILED);
		count_in(&kfunc_errors, errno_slot < KFUNC_ERRNO_SLOTS ? errno_slot : KFUNC_ERRNO_SLOTS - 1);
		return TC_ACT_OK;
	}
	COUNT(COUNTER_CREATED);
	return TC_ACT_OK;
}

/* A decapsulated VALIDATED segment: if it is a handshake ACK with a valid cookie and a listener waits on
 * its tuple, have the kernel create the connection. */
static __always_inline int create_connection(struct __sk_buff *skb, const struct segment *seg,
					     const struct arrival *arrival, const struct backend_config *cfg)
{
	if ((seg->flags & (TCP_FLAG_ACK | TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_FIN)) != TCP_FLAG_ACK)
		return TC_ACT_OK;
	/* The lookup first: a connection the segment's tuple already has (the request right behind the ACK that
	 * made it, a retransmitted ACK) owns it as it owns an unflagged segment, which passes on the encapsulation's
	 * MAC alone; the cookie only guards what the segment makes or kills (a connection, a recycled socket). */
	struct bpf_sock *skc = socket_of(skb, seg);
	if (skc && skc->state != BPF_TCP_LISTEN && skc->state != BPF_TCP_TIME_WAIT &&
	    skc->state != BPF_TCP_NEW_SYN_RECV && segment_of_connection(skc, seg)) {
		COUNT(COUNTER_NOT_LISTENER);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}
	__u32 cookie = seg->ack - 1;
	const struct salt_slot *slot = cookie_slot(cookie);
	if (!slot || !epoch_accepted(slot->epoch, bpf_ktime_get_tai_ns() + cfg->clock_offset_ns, cfg->period_ns,
				     cfg->skew_ns) ||
	    !cookie_mac_valid(slot, seg, cookie)) {
		COUNT(COUNTER_COOKIE_BAD);
		if (skc)
			bpf_sk_release(skc);
		return TC_ACT_SHOT;
	}
	if (!skc) {
		COUNT(COUNTER_NO_SOCKET);
		return TC_ACT_OK;
	}
	if (skc->state != BPF_TCP_LISTEN) {
		int verdict = recycle(skb, seg, skc, arrival, cfg);

		bpf_sk_release(skc);
		return verdict;
	}
	struct recycle *recycle_owned;
	if (recycle_waits(skb, seg, &recycle_owned)) {
		bpf_sk_release(skc);
		return queue_again(skb, seg, arrival, cfg);
	}
	return connect_at_listener(skb, seg, skc, cookie, recycle_owned, cfg);
}

/* The owner's copy queued behind its RST (queue_owner_again), decapsulated and marked: accepted only as the
 * owner its tuple's recycle names (its IP length and ack, which its first run checked with the encapsulation
 * and the cookie), however long the backlog held it (the window only bounds how long the others wait). The
 * RST killed the socket: it meets the listener and makes the connection. It did not: the recycle falls back
 * to the loader, with the encapsulation the owner arrived in. */
static __always_inline int recycle_owner_again(struct __sk_buff *skb, const struct backend_config *cfg)
{
	struct recycle_key key;
	struct segment seg = {};
	struct recycle *recycling = 0;

	skb->mark = 0; /* the host's own marks are no business of this program's */
	if (parse_segment(skb, &seg)) {
		recycle_key_of(&key, &seg);
		recycling = bpf_map_lookup_elem(&time_wait_recycling, &key);
	}
	if (!recycling || (recycling->state & RECYCLE_FALLBACK) ||
	    RECYCLE_OWNER_LENGTH(recycling->state) != seg.ip_length || recycling->owner_ack != seg.ack) {
		COUNT(COUNTER_TIME_WAIT_UNREPORTED);
		return TC_ACT_SHOT;
	}
	struct arrival arrival = recycling->owner_arrival;
	struct bpf_sock *skc = socket_of(skb, &seg);
	if (!skc) {
		COUNT(COUNTER_NO_SOCKET);
		return TC_ACT_OK;
	}
	if (skc->state == BPF_TCP_TIME_WAIT || skc->state == BPF_TCP_NEW_SYN_RECV) {
		bpf_sk_release(skc);
		return recycle_fallen_back(skb, &seg, &arrival, recycling, cfg);
	}
	if (skc->state != BPF_TCP_LISTEN) {
		COUNT(COUNTER_NOT_LISTENER);
		bpf_sk_release(skc);
		return TC_ACT_OK;
	}
	return connect_at_listener(skb, &seg, skc, seg.ack - 1, recycling, cfg);
}

/* Pass the decapsulated segment on to `next`, as encap.chain builds it: the same inner packet, UDP ports
 * and former owners, from this backend to that one, flagged CHAINED, MACed anew with the primary encap
 * key; back out of the farm interface it came in by, the kernel resolving the neighbour when it is not
 * yet (backends seldom talk to each other). Returns the verdict, CHAIN_UNROUTED when there is no route
 * to `next` (the packet untouched: this backend is then the last hop), or CHAIN_BROKEN. */
#define CHAIN_UNROUTED -1
#define CHAIN_BROKEN -2
static __always_inline int chain_to(struct __sk_buff *skb, const struct segment *seg, const struct arrival *arrival,
				    __be32 next, const struct backend_config *cfg)
{
	__u32 zero = 0;
	const struct encap_keys *keys = bpf_map_lookup_elem(&encap_keys, &zero);
	__u8 flags = arrival->header.flags | ENCAP_FLAG_CHAINED;
	union encap_message message;
	struct encap_header header = arrival->header;
	/* The outer lengths count what the packet carries (encap.chain), not the inner header's own length
	 * field, which nothing checked: tests/test_fuzz_backend.py. */
	__u32 carried = skb->len - sizeof(struct ethhdr);

	if (carried > 0xffff - ENCAP_OVERHEAD)
		return CHAIN_UNROUTED;
	/* From the egress's view, out of the interface it came in by: a backend need not forward. */
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_UDP,
		.sport = arrival->source_port,
		.dport = bpf_htons(cfg->encap_port),
		.tot_len = ENCAP_OVERHEAD + carried,
		.ifindex = skb->ifindex,
		.ipv4_src = arrival->self,
		.ipv4_dst = next,
	};
	int route = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return CHAIN_UNROUTED;
	if (!keys || !keys->nkeys)
		return CHAIN_UNROUTED;
	encap_message_of(&message, arrival->self, next, seg, flags, &arrival->header.former);
	__u64 mac = bpf_cpu_to_be64(encap_mac(&message, keys->keys[0]));
	header.flags = flags;
	__builtin_memcpy(header.mac, &mac, sizeof(mac));
	if (encapsulate(skb, arrival->self, next, arrival->source_port, &header, carried, cfg,
			BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return CHAIN_BROKEN;
	if (route == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh next_hop = {.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst};

		return bpf_redirect_neigh(fib.ifindex, &next_hop, sizeof(next_hop), 0);
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) || bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return CHAIN_BROKEN;
	return bpf_redirect(fib.ifindex, 0);
}

/* Who owns the flow of `seg` here (flow_owner). */
static __always_inline enum flow_owner owner_here(struct __sk_buff *skb, const struct segment *seg)
{
	struct bpf_sock *skc = socket_of(skb, seg);
	enum flow_owner owner = flow_owner(skc, seg);

	if (skc)
		bpf_sk_release(skc);
	return owner;
}

/* Deliver the segment to the listener of its VIP and port, past the TIME_WAIT socket the stack would find
 * first (bpf_sk_assign: tcp_v4_rcv and tcp_v6_rcv take the assigned socket before their lookup): the
 * listener answers it with a RST. The lookup without the client's address and port finds no connection,
 * only the listener. 0, or -1 when there is none or it cannot be assigned. */
static __always_inline int deliver_to_listener(struct __sk_buff *skb, const struct segment *seg)
{
	struct bpf_sock_tuple tuple = {};
	__u32 tuple_size = socket_tuple_of(&tuple, seg);

	if (seg->family == 4) {
		tuple.ipv4.saddr = 0;
		tuple.ipv4.sport = 0;
	} else {
		__builtin_memset(tuple.ipv6.saddr, 0, sizeof(tuple.ipv6.saddr));
		tuple.ipv6.sport = 0;
	}
	struct bpf_sock *listener = bpf_sk_lookup_tcp(skb, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!listener)
		return -1;
	long assigned = listener->state == BPF_TCP_LISTEN ? bpf_sk_assign(skb, listener, 0) : -1;

	bpf_sk_release(listener);
	return assigned ? -1 : 0;
}

/* No connection here owns the flow of `seg`: pass the packet on to the next owner the header names
 * (next_owner), if any. Returns the verdict, or CHAIN_UNROUTED when this is the last hop (no next owner,
 * or no route to it: the packet untouched). */
static __always_inline int pass_on(struct __sk_buff *skb, const struct segment *seg, const struct arrival *arrival,
				   const struct backend_config *cfg)
{
	__be32 next = next_owner(&arrival->header, arrival->self);

	if (!next)
		return CHAIN_UNROUTED;
	int verdict = chain_to(skb, seg, arrival, next, cfg);

	if (verdict == CHAIN_BROKEN || verdict == TC_ACT_SHOT) {
		COUNT(COUNTER_CHAIN_FAILED);
		return TC_ACT_SHOT;
	}
	if (verdict != CHAIN_UNROUTED) {
		COUNT(COUNTER_CHAINED);
		return verdict;
	}
	COUNT(COUNTER_CHAIN_FAILED); /* no route to it: the last hop, so the client is not left hanging */
	return CHAIN_UNROUTED;
}

/* A decapsulated unflagged segment, or an ICMP error about the flow `seg` (icmp_error_accepted). A front
 * cannot tell a forged ACK from one of an established connection, so it forwards both: pass what a
 * connection owns. What none owns (no socket, only a listener, or a TIME_WAIT socket of an earlier
 * connection: flow_owner; then delivered past it to the listener for the RST) may belong to a connection a former
 * owner of the flow holds (a backend change moved the flow here): pass it on (next_owner), an error
 * about the flow as its segments. The last hop is where the kernel would answer a segment with a RST,
 * unbounded, so it is passed only within the reset budget (a client whose connection this backend lost
 * still gets its reset) and the rest dropped. A client's RST is never answered: dropped. An error is
 * answered by nothing: passed. docs/backend.md. */
static __always_inline int pass_if_owned(struct __sk_buff *skb, const struct segment *seg,
					 const struct arrival *arrival, const struct backend_config *cfg)
{
	int icmp = arrival->header.flags & ENCAP_FLAG_ICMP;
	enum flow_owner owner = owner_here(skb, seg);

	if (owner == FLOW_OWNED) {
		if (icmp)
			COUNT(COUNTER_ICMP_PASSED);
		return TC_ACT_OK;
	}
	int verdict = pass_on(skb, seg, arrival, cfg);

	if (verdict != CHAIN_UNROUTED)
		return verdict;
	if (icmp) {
		COUNT(COUNTER_ICMP_PASSED);
		return TC_ACT_OK;
	}
	if (!(seg->flags & TCP_FLAG_RST) && reset_allowed(cfg) &&
	    (owner != FLOW_TIME_WAIT_PAST || !deliver_to_listener(skb, seg))) {
		COUNT(COUNTER_NO_FLOW_RESET);
		return TC_ACT_OK;
	}
	COUNT(COUNTER_NO_FLOW_DROPPED);
	return TC_ACT_SHOT;
}

/* Behind fronts no SYN to a protected VIP should ever reach a backend: count those that do outside the
 * encapsulation (SYNs to the backend's own address, e.g. a metrics scrape, are not). */
static __always_inline void count_plain_syn(struct __sk_buff *skb)
{
	struct segment seg = {};

	if (parse_segment(skb, &seg) && (seg.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
	    bpf_map_lookup_elem(&protected_vips, seg.daddr))
		COUNT(COUNTER_SYN_RECEIVED);
}

/* What a front forwards: TCP to a protected VIP and port, never a SYN (a front answers those itself). */
static __always_inline int forwarded_by_a_front(const struct segment *seg)
{
	__u16 port = bpf_ntohs(seg->dport);

	return !(seg->flags & TCP_FLAG_SYN) && bpf_map_lookup_elem(&protected_vips, seg->daddr) &&
	       bpf_map_lookup_elem(&protected_ports, &port);
}

/* --- TCP Fast Open: a SYN a front forwarded flagged FASTOPEN (its TFO cookie held there) --- */

/* Passed to the stack, whose TCP checks the cookie again with the farm's key (net.ipv4.tcp_fastopen_key,
 * installed by the loader), creates the connection and hands the SYN's data to the application before
 * the handshake completes, within the listener's TFO queue (its TCP_FASTOPEN qlen); its SYN-ACK goes to
 * the client directly. Only a SYN (no ACK, RST or FIN) to a protected VIP and port, never chained or
 * flagged VALIDATED as well: anything else under this flag is no front's (docs/backend.md). */
static __always_inline int pass_fastopen_syn(const struct segment *seg, __u8 flags)
{
	__u16 port = bpf_ntohs(seg->dport);

	if ((seg->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)) != TCP_FLAG_SYN ||
	    (flags & (ENCAP_FLAG_VALIDATED | ENCAP_FLAG_CHAINED)) || !bpf_map_lookup_elem(&protected_vips, seg->daddr) ||
	    !bpf_map_lookup_elem(&protected_ports, &port)) {
		COUNT(COUNTER_ENCAP_REFUSED);
		return TC_ACT_SHOT;
	}
	COUNT(COUNTER_DECAPSULATED);
	COUNT(COUNTER_FASTOPEN_PASSED);
	return TC_ACT_OK;
}

/* Strip outer IPv4 + UDP + header; the inner family becomes skb->protocol and the Ethernet type. */
static __always_inline int decapsulate(struct __sk_buff *skb, __u8 inner_version)
{
	__be16 inner_proto = bpf_htons(inner_version == 6 ? ETH_P_IPV6 : ETH_P_IP);
	__u64 flags = inner_version == 6 ? ADJ_ROOM_DECAP_L3_IPV6 : ADJ_ROOM_DECAP_L3_IPV4;

	if (bpf_skb_adjust_room(skb, -ENCAP_OVERHEAD, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	if (inner_version == 6 &&
	    bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_proto), &inner_proto, 2, 0))
		return -1;
	return 0;
}

/* A decapsulated packet flagged ICMP: an error a front received about one of this backend's flows (a
router towards the client: "fragmentation needed", "packet too big", "unreachable", "time exceeded").
Accepted only when the MAC (the front's, or that of the backend that passed it on) covers the flow, the
flags and the former owners, it is not flagged VALIDATED, and the flow is a protected VIP and port the
error was sent to; `flow` is then the flow (its ip_length the error's, all of which a chain passes on).
pass_if_owned then gives it to the stack where a connection here owns the flow (its TCP finds the socket
from the quoted segment and lowers its path MTU; it ignores errors whose quoted sequence number is
outside the window), or else passes it on along the chain as the flow's segments (a backend change left
the connection on a former owner); the last hop's stack drops it. docs/backend.md. */
static __always_inline int icmp_error_accepted(struct __sk_buff *skb, const struct arrival *arrival,
					       struct segment *flow)
{
	struct segment error = {};

	if (!parse_icmp_error((void *)(long)skb->data, (void *)(long)skb->data_end, &error, flow) ||
	    (arrival->header.flags & ENCAP_FLAG_VALIDATED)) {
		COUNT(COUNTER_ENCAP_REFUSED);
		return 0;
	}
	if (!encap_mac_valid(&arrival->header, arrival->front, arrival->self, flow)) {
		COUNT(COUNTER_ENCAP_BAD_MAC);
		return 0;
	}
	if (!forwarded_by_a_front(flow) || __builtin_memcmp(error.daddr, flow->daddr, 16)) {
		COUNT(COUNTER_ENCAP_REFUSED);
		return 0;
	}
	return 1;
}

/* The most of a frame the checks below read in place: the outer headers, the inner IPv4 header with options and
 * an ICMP error's quote (header, IPv4 header with options, 8 bytes of TCP). Any frame may hold part of that in
 * pages, where the checks would not see it and an authentic encapsulation would go to the UDP stack as plain
 * traffic or be dropped as malformed: a packet socket's large frame (only its Ethernet header linear), a
 * driver's short one built from its receive pages (napi_gro_frags: a tap with IFF_NAPI_FRAGS; GRO pulls only
 * the headers it parses). tests/test_fuzz_backend.py. */
#define HEADERS_READ (sizeof(struct ethhdr) + ENCAP_OVERHEAD + 60 + ICMP_HEADER_BYTES + 60 + QUOTED_TCP_BYTES)
/* What tells an encapsulation from plain traffic: Ethernet, IPv4 without options, UDP. */
#define ENCAPSULATION_TOLD (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

/* Make the first `bytes` of the frame (all of a shorter one) linear. A linear frame pays one comparison; plain
 * traffic is pulled only as far as ENCAPSULATION_TOLD, which a TCP segment's linear headers always cover: a
 * clone (loopback's, a local client's short segments) would otherwise be copied for nothing. */
static __always_inline void pull_headers(struct __sk_buff *skb, __u32 bytes)
{
	if (skb->len < bytes)
		bytes = skb->len;
	if ((void *)(long)skb->data + bytes > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, bytes);
}

SEC("tc")
int synproxy_backend(struct __sk_buff *skb)
{
	pull_headers(skb, ENCAPSULATION_TOLD);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 zero = 0;
	struct backend_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct segment seg = {};

	/* Encapsulated means: outer IPv4 without options or fragmentation, UDP to the encap port. A
	 * front always sends it so (DF set); anything else is ordinary traffic. */
	if (!cfg || (void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(IP_MF_OR_OFFSET)) ||
	    udp->dest != bpf_htons(cfg->encap_port)) {
		/* The loopback device's own traffic: this program is there only for the TIME_WAIT recycler's
		 * re-injected segments (recycle). */
		if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
			return TC_ACT_OK;
		if (cfg && skb->mark == RECYCLE_OWNER_MARK)
			return recycle_owner_again(skb, cfg);
		count_plain_syn(skb);
		COUNT(COUNTER_PASSED);
		return TC_ACT_OK;
	}
	pull_headers(skb, HEADERS_READ);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	udp = (void *)(ip + 1);
	struct encap_header *header = (void *)(udp + 1);
	if ((void *)(udp + 1) > data_end) { /* the pull never shortens the linear part: for the verifier */
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}

	/* Not as a front or a backend writes it: its source address means nothing, and decapsulated it
	 * would pass the inner packet beyond ip_rcv's checks of the outer header. */
	if (!outer_ipv4_sound(ip, skb->len - sizeof(*eth))) {
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	/* A chained packet comes from a backend, which this one may not know (added since its last
	 * reload): its MAC alone admits it. Everything else must come from a trusted front. */
	__u8 front[16];
	ipv4_mapped(front, &ip->saddr);
	int chained = (void *)(header + 1) <= data_end && (header->flags & ENCAP_FLAG_CHAINED);
	if (!chained && !bpf_map_lookup_elem(&trusted_fronts, front)) {
		COUNT(COUNTER_UNTRUSTED);
		return TC_ACT_SHOT;
	}
	__u8 *inner = (void *)(header + 1);
	if ((void *)(inner + 1) > data_end || header->magic != ENCAP_MAGIC || header->version != ENCAP_VERSION ||
	    header->reserved) {
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	/* Kept past decapsulate(), which moves the packet. */
	struct arrival arrival = {.header = *header, .front = ip->saddr, .self = ip->daddr, .source_port = udp->source};
	__u8 inner_version = *inner >> 4;
	if ((inner_version != 4 && inner_version != 6) || decapsulate(skb, inner_version)) {
		COUNT(COUNTER_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (arrival.header.flags & ENCAP_FLAG_ICMP) {
		if (!icmp_error_accepted(skb, &arrival, &seg))
			return TC_ACT_SHOT;
		goto decapsulated; /* one inlined pass_if_owned: two copies of the chain's stack exceed 512 bytes */
	}
	/* The MAC covers the inner addresses and ports: only a TCP segment can be checked (and a front
	 * forwards nothing else). */
	if (!parse_segment(skb, &seg)) {
		COUNT(COUNTER_ENCAP_REFUSED);
		return TC_ACT_SHOT;
	}
	if (!encap_mac_valid(&arrival.header, arrival.front, arrival.self, &seg)) {
		COUNT(COUNTER_ENCAP_BAD_MAC);
		return TC_ACT_SHOT;
	}
	if (arrival.header.flags & ENCAP_FLAG_FASTOPEN)
		return pass_fastopen_syn(&seg, arrival.header.flags);
	/* Only a front flags VALIDATED and only a backend CHAINED: a backend never passes on a handshake. */
	if (!forwarded_by_a_front(&seg) ||
	    (arrival.header.flags & (ENCAP_FLAG_VALIDATED | ENCAP_FLAG_CHAINED)) ==
		    (ENCAP_FLAG_VALIDATED | ENCAP_FLAG_CHAINED)) {
		COUNT(COUNTER_ENCAP_REFUSED);
		return TC_ACT_SHOT;
	}
decapsulated:
	COUNT(COUNTER_DECAPSULATED);
	if (arrival.header.flags & ENCAP_FLAG_VALIDATED)
		return create_connection(skb, &seg, &arrival, cfg);
	return pass_if_owned(skb, &seg, &arrival, cfg);
}

char LICENSE[] SEC("license") = "GPL";
