/* Shared definitions of the synproxy BPF programs: the cookie (docs/cookie.md), the front -> backend
 * encapsulation (docs/backend.md), SipHash-2-4, TCP segment parsing, and the map value layouts that
 * synproxy/backend/loader.py and synproxy/front/fastpath.py pack. Needs only the uapi headers and
 * libbpf's bpf_helpers.h: no vmlinux.h, so building needs no bpftool. */
#ifndef SYNPROXY_H
#define SYNPROXY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* --- cookie layout: MAC 31..10 | epoch 9..8 | wscale 7..4 | SACK 3 | ECN 2 | MSS index 1..0 --- */
#define COOKIE_DATA_BITS 10
#define COOKIE_DATA_MASK 0x3ffu
#define COOKIE_MAC_MASK 0x3fffffu
#define COOKIE_EPOCH_SHIFT 8
#define COOKIE_EPOCH_SLOTS 4
#define COOKIE_WSCALE_SHIFT 4
#define COOKIE_WSCALE_NONE 15
#define COOKIE_WSCALE_MAX 14
#define COOKIE_SACK_BIT (1u << 3)
#define COOKIE_ECN_BIT (1u << 2)
#define COOKIE_MSS_MASK 0x3u
#define COOKIE_MAC_INPUT_BYTES 48

/* The Linux kernel's own SYN-cookie MSS tables. */
static const __u16 mss_table_v4[4] = {536, 1300, 1440, 1460};
static const __u16 mss_table_v6[4] = {1220, 1420, 1440, 8940};

/* --- encapsulation v3: outer IPv4 (20) + UDP (8) + this header (20) (docs/backend.md) --- */
#define ENCAP_MAGIC 0x5c
#define ENCAP_VERSION 3
#define ENCAP_FLAG_VALIDATED 0x01 /* a handshake ACK whose cookie a front found valid */
#define ENCAP_FLAG_ICMP 0x02      /* an ICMP error about the flow; the MAC's tuple is the flow's (client -> VIP) */
#define ENCAP_FLAG_CHAINED 0x04   /* passed on by a backend to a former owner (encap.next_owner) */
#define ENCAP_FLAG_FASTOPEN 0x08  /* a SYN whose TCP Fast Open cookie a front found valid: passed to the stack */
#define ENCAP_OVERHEAD 48
#define ENCAP_MAC_INPUT_BYTES 56

/* The flow's former owners (Beamer's chain, two deep; maglev.PreviousOwners), 0: none. */
struct former_owners {
	__be32 previous; /* the most recent */
	__be32 earlier;  /* the oldest within the window, or a draining owner */
};

struct encap_header {
	__u8 magic;
	__u8 flags;
	__u8 version;     /* ENCAP_VERSION */
	__u8 reserved;    /* zero */
	struct former_owners former;
	__u8 mac[8];      /* SipHash-2-4 of encap_message_of()'s 56 bytes under an encap key, big endian */
};

/* bpf_skb_adjust_room flags (Linux 6.3) that also set skb->protocol to the inner family; the 6.1 uapi
 * headers Debian 12 ships do not name them yet. */
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

/* --- map values --- */
#define MAX_SECRETS 2

struct backend_config {
	__u64 period_ns;       /* salt epoch length; 0 until the loader has written the clock */
	__u64 skew_ns;         /* the clock skew tolerated between nodes */
	__s64 clock_offset_ns; /* CLOCK_REALTIME - CLOCK_TAI: epochs follow the wall clock */
	__u16 encap_port;      /* host order */
	__u8 server_wscale;    /* the window scale the fronts announce; the kernel's rcv_wscale */
	__u8 pad;
	__u32 cpus;            /* CPUs that may run this program at once (the accept queue's margin) */
	__u64 reset_cost_ns;   /* one reset for a packet of no connection costs this much of a CPU's
				* credit (CPUs / rate per second, in ns); 0: no such packet is passed */
	__u64 reset_credit_ns; /* the most credit a CPU holds: its share of the burst, at least one reset */
};

struct token_bucket {      /* per CPU: the backend's resets for packets of no connection, the front's ICMP errors */
	__u64 credit_ns;
	__u64 updated_ns;  /* bpf_ktime_get_ns() of the last take; 0 at start, so the bucket starts full */
};

/* The credit a bucket holds at `now`. */
static __always_inline __u64 token_credit(const struct token_bucket *bucket, __u64 now, __u64 credit_max_ns)
{
	__u64 credit = bucket->credit_ns + (now - bucket->updated_ns);

	return credit > credit_max_ns ? credit_max_ns : credit;
}

/* May this CPU spend one more token? A token bucket kept in ns of credit: time adds credit up to
 * credit_max_ns, a token costs cost_ns (CPUs / rate per second, in ns: each CPU has its share of the
 * rate, so the node's total stays within the rate plus the burst whichever CPUs the packets land on;
 * loading.per_cpu_token_bucket computes both). A cost of 0 allows nothing. */
static __always_inline int token_take(struct token_bucket *bucket, __u64 cost_ns, __u64 credit_max_ns)
{
	__u64 now = bpf_ktime_get_ns(), credit;

	if (!bucket || !cost_ns)
		return 0;
	credit = token_credit(bucket, now, credit_max_ns);
	bucket->updated_ns = now;
	if (credit < cost_ns) {
		bucket->credit_ns = credit;
		return 0;
	}
	bucket->credit_ns = credit - cost_ns;
	return 1;
}

struct salt_slot {          /* one per epoch mod 4 */
	__u32 valid;
	__u32 nkeys;        /* primary secret first, then a retired one while rotating */
	__u64 epoch;        /* its low 32 bits enter the MAC */
	__u8 keys[MAX_SECRETS][16];
};

/* The keys a backend checks the encapsulation's MAC with: one element (key 0), replaced whole by the
 * loader. A hash map, because an update of a hash element swaps it under RCU while an array's is copied
 * in place, and a reader could see a key half written. */
struct encap_keys {
	__u32 nkeys; /* primary secret's key first, then a retired one's while rotating */
	__u32 pad;
	__u8 keys[MAX_SECRETS][16];
};

struct front_config {
	__u64 period_ns;       /* salt epoch length; 0 until the loader has written the rest */
	__s64 clock_offset_ns; /* CLOCK_REALTIME - CLOCK_TAI: epochs and TSval follow the wall clock */
	__u16 mss[2];          /* the MSS announced to IPv4 and to IPv6 clients */
	__u8 server_wscale;
	__u8 sack;             /* offer SACK when the client does */
	__u8 ecn;              /* accept ECN when the client asks for it */
	__u8 syn_reply_ingress; /* front.syn_reply: ingress: a SYN-ACK goes back to the SYN's sender */
	__u8 timestamps;       /* answer the client's timestamps */
	__u8 window_scaling;   /* answer the client's window scale (else the cookie records none) */
	__u64 generation;      /* the front's `forwarding` and `salts` as last written: a fresh random value
				* (never 0) each time either changes, written after them (front.bpf.c: local_copy) */
};

/* Both programs' salts, key = epoch mod 4, written by their loaders (the backend: every accepted epoch
 * and the next; the front: the current and the next); a slot no epoch uses is absent. A hash map, not an
 * array: an update replaces the element under RCU, so a reader never sees a key half written (an array's
 * update is a memcpy under the reader: tests/test_backend_bpf.py measured torn reads). Not preallocated: a
 * replaced element is freed after an RCU grace period, where a preallocated one is reused at once. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COOKIE_EPOCH_SLOTS);
	__type(key, __u32);
	__type(value, struct salt_slot);
} salts SEC(".maps");

/* Both programs' protected VIPs (the front answers SYNs to these; the backend accepts encapsulated
 * segments only to these and counts plain SYNs that reach it), IPv4 as ::ffff:a.b.c.d. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u8[16]);
	__type(value, __u8);
} protected_vips SEC(".maps");

/* Outcomes of the front programs, counted per program and IP version in their per-CPU `counters` (index =
 * (path * FRONT_COUNTER_MAX + outcome) * 2 + (IPv6 ? 1 : 0)); synproxy/front/fastpath.py names them in
 * this order. "Left to the queue" means passed
 * on (TC_ACT_OK, XDP_PASS) unchanged: the NFQUEUE and the Python handler decide. */
enum front_counter {
	FRONT_NOT_PROTECTED, /* TCP, but not to a protected VIP and port: left to the kernel */
	FRONT_QUEUED,        /* protected, but not what the program handles (tc: anything but a SYN; both: a
			      * SYN with IP options or malformed options, a SYN with ACK/RST/FIN;
			      * XDP: IPv4 options, lengths the handler calls malformed, no forwarding
			      * configuration or Maglev entry yet): left to the queue */
	FRONT_UNVERIFIED,    /* a SYN or a validating ACK whose checksum does not hold here (bad, or a
			      * local sender's partial one), or an IPv4 header's: left to the queue */
	FRONT_NO_SALT,       /* a SYN (XDP: or an ACK) left to the queue: the map holds no salt for the
			      * current epoch */
	FRONT_SYN_ANSWERED,  /* a SYN answered: a SYN-ACK sent */
	FRONT_UNROUTED,      /* left to the queue: no route (or, at XDP, no resolved neighbour) to the
			      * client or the backend found here */
	FRONT_UNSENT,        /* tc: a SYN dropped, rewriting the packet failed; XDP: left to the queue,
			      * the driver left no room to grow the packet */
	FRONT_VALIDATED,     /* XDP: an ACK whose cookie validates, encapsulated flagged VALIDATED */
	FRONT_FORWARDED,     /* XDP: not an ACK, or with RST or FIN, encapsulated unflagged */
	FRONT_FORWARDED_BAD_MAC,       /* XDP: an ACK whose cookie's MAC does not hold (established
					* traffic, mostly), encapsulated unflagged */
	FRONT_FORWARDED_EXPIRED_EPOCH, /* XDP: an ACK whose cookie names no accepted epoch, encapsulated
					* unflagged */
	FRONT_TOO_BIG,       /* XDP: the encapsulation would exceed the farm MTU: left to the queue */
	FRONT_UNPARSED,      /* XDP: TCP to a protected VIP the program does not parse (IPv4 fragments,
			      * IPv6 extension headers): left to the queue */
	FRONT_ICMP_FORWARDED,     /* XDP: an ICMP error about a protected flow, encapsulated flagged ICMP to
				   * the flow's backend */
	FRONT_ICMP_RATE_LIMITED,  /* XDP: the same beyond the ICMP budget: dropped */
	FRONT_ICMP_NOT_PROTECTED, /* XDP: an ICMP error to a VIP about another port, or sent elsewhere than
				   * the quoted segment's sender: dropped */
	FRONT_FASTOPEN_COOKIE_ISSUED, /* a SYN answered (counted syn_answered too) with a TCP Fast Open cookie */
	FRONT_FASTOPEN_ACCEPTED,      /* a SYN with a valid TCP Fast Open cookie and data, encapsulated flagged
				       * FASTOPEN to the flow's backend */
	/* A SYN with a TFO cookie answered (syn_answered too) with the stateless cookie SYN-ACK, by why
	 * (handler.FASTOPEN_FALLBACKS, in that order): */
	FRONT_FASTOPEN_DISABLED,
	FRONT_FASTOPEN_INVALID_COOKIE,
	FRONT_FASTOPEN_NO_DATA,
	FRONT_FASTOPEN_RATE_LIMITED,
	FRONT_FASTOPEN_TOO_BIG,
	FRONT_QUEUE_RATE_LIMITED,     /* tc: what it would leave to the queue, beyond the queue's budget
				       * (front.queue_packets_per_second): dropped */
	FRONT_COUNTER_MAX,
};

/* Which front program counted: the tc one (SYNs) or the XDP one (everything protected). */
enum front_path {
	FRONT_PATH_TC,
	FRONT_PATH_XDP,
	FRONT_PATH_MAX,
};

/* The front's forwarding configuration: one element (key 0) of a hash map, replaced whole (see struct
 * encap_keys for why). Absent until the loader writes it: the XDP program then leaves all but SYNs to
 * the queue. */
struct front_forwarding {
	__be32 farm_address; /* the front's address on the farm network: the outer source */
	__be16 encap_port;
	__u16 farm_mtu;      /* host order: the largest outer packet */
	__u64 skew_ns;       /* SaltSchedule.skew: how far an ACK's epoch may lie outside the clock's */
	__u8 encap_key[16];  /* the minting secret's encap key */
	__u8 flow_key[16];   /* maglev.derive_flow_key */
};

/* The front's Maglev table (maglev.build_table, written by the loader), entry flow_hash % size: the
 * backend's IPv4 address itself (a reader never pairs an old index with a new backend list) and the
 * slot's former owners (maglev.PreviousOwners), one lookup for all. The loader writes the former owners
 * before the current one (synproxy/front/fastpath.py). current 0: not written yet. */
#define MAGLEV_TABLE_SIZE 65537
struct maglev_owners {
	__be32 current;
	struct former_owners former;
};

/* Indices of the per-CPU `counters` map; synproxy/backend/loader.py names them in this order. */
enum counter {
	COUNTER_PASSED,            /* not encapsulated: left alone */
	COUNTER_DECAPSULATED,      /* from a trusted front, header removed */
	COUNTER_UNTRUSTED,         /* encapsulated, but not from a trusted front: dropped */
	COUNTER_MALFORMED,         /* encapsulated, but a wrong outer IPv4 header, header or inner version: dropped */
	COUNTER_COOKIE_BAD,        /* flagged VALIDATED, but no accepted salt gives its MAC: dropped */
	COUNTER_NO_SOCKET,         /* valid cookie, nothing listens on the tuple */
	COUNTER_NOT_LISTENER,      /* a connection already exists (a retransmitted ACK): passed, the cookie unchecked */
	COUNTER_CREATED,           /* the kfunc made a request socket: a connection is born */
	COUNTER_KFUNC_FAILED,      /* the kfunc refused (see kfunc_errors by errno) */
	COUNTER_SYN_RECEIVED,      /* TCP SYNs that reached this backend (should stay 0 behind fronts) */
	COUNTER_ENCAP_BAD_MAC,     /* from a trusted front's address, but no encap key gives its MAC: dropped */
	COUNTER_ENCAP_REFUSED,     /* from a trusted front, but not what a front forwards: not a TCP segment,
				    * or an authentic SYN or one not to a protected VIP and port: dropped */
	COUNTER_LISTEN_OVERFLOW,   /* valid cookie, but the listener's accept queue is full: passed, and the
				    * listener resets it (the kernel would drop the connection silently) */
	COUNTER_NO_FLOW_RESET,     /* unflagged, no connection owns it (none, or only a listener): passed
				    * within the reset budget, and the kernel answers it with a RST */
	COUNTER_NO_FLOW_DROPPED,   /* the same beyond the budget, or a client's RST (never answered): dropped */
	COUNTER_CHAINED,           /* unflagged, no connection owns it, a former owner to try: re-encapsulated
				    * to it (Beamer's daisy chain, encap.next_owner) */
	COUNTER_CHAIN_FAILED,      /* the same, but re-encapsulating or routing it failed: dropped */
	COUNTER_ICMP_PASSED,       /* flagged ICMP: an error about a protected flow, passed to the stack */
	COUNTER_TIME_WAIT_RECYCLED,   /* valid cookie meeting a TIME_WAIT socket RFC 6191 would recycle for its
				       * SYN: once per new connection, the program's RST ends the socket (or, where the
				       * kernel ignores it, the loader destroys it and re-injects the segments) */
	COUNTER_TIME_WAIT_REFUSED,    /* the same, RFC 6191 would refuse the SYN: passed to the TIME_WAIT socket */
	COUNTER_TIME_WAIT_UNREPORTED, /* the same as recycled, but the ring buffer was full (or no re-queue): dropped, unreported */
	COUNTER_FASTOPEN_PASSED,      /* flagged FASTOPEN: a SYN whose TFO cookie a front found valid, passed to the stack */
	COUNTER_REQUEST_RECYCLED,     /* valid cookie meeting a request socket a SYN straight to this backend left: reset, and
				       * the segment queued again behind its RST, once per new connection (as time_wait_recycled) */
	COUNTER_CONNECTION_RECYCLED,  /* valid cookie meeting another connection of the tuple, one its client forgot: reset,
				       * and the segment queued again behind its RST (as request_recycled) */
	COUNTER_MAX,
};
#define KFUNC_ERRNO_SLOTS 64

/* What the backend program tells its loader through the `time_wait` ring buffer: a validated handshake
 * ACK (or the data right behind it) met a TIME_WAIT socket that RFC 6191 lets a new SYN recycle, and the
 * program's RST could not end it (net.ipv4.tcp_rfc1337=1; recycle_time_wait), and was dropped. The loader destroys the socket (sock_diag) and re-injects the packet, encapsulated again from
 * the fields below, on the loopback device, where this program passes it once more (docs/backend.md).
 * Addresses in the 16-byte form, ports network order. Sent without the unused tail of packet[]. */
#define TIME_WAIT_PACKET_MAX 1600 /* a 1500-byte farm MTU's inner packets; larger ones are left to the client */
struct time_wait_event {
	__u8 saddr[16];  /* the client */
	__u8 daddr[16];  /* the VIP */
	__be16 sport;
	__be16 dport;
	__u32 seq;       /* the segment's: the client's ISN + 1 */
	__u32 ack;       /* the segment's: the cookie + 1 */
	__u8 family;
	__u8 reinjected; /* 1: it arrived on the loopback device, re-injected already: not again */
	__u16 length;    /* bytes of packet[]: the inner IP packet, or 0 when it did not fit */
	__be32 front;    /* the outer source address */
	__be32 backend;  /* the outer destination address */
	__be16 source_port; /* the outer UDP ports */
	__be16 encap_port;
	struct encap_header header; /* as received, MAC included */
	__u8 packet[TIME_WAIT_PACKET_MAX];
};

/* The kernel's struct bpf_tcp_req_attrs (include/net/tcp.h); attrs__sz must be its size, 20, and
 * reserved[] zero, or the kfunc answers -EINVAL. */
struct bpf_tcp_req_attrs {
	__u32 rcv_tsval;
	__u32 rcv_tsecr;
	__u16 mss;
	__u8 rcv_wscale;
	__u8 snd_wscale;
	__u8 ecn_ok;
	__u8 wscale_ok;
	__u8 sack_ok;
	__u8 tstamp_ok;
	__u8 usec_ts_ok;
	__u8 reserved[3];
};
_Static_assert(sizeof(struct bpf_tcp_req_attrs) == 20, "the kfunc checks attrs__sz against 20");

/* --- SipHash over a message of whole 64-bit little-endian words (the cookie's 48 bytes and the
 * encapsulation's 56: SipHash-2-4; the flow hash's 40: SipHash-1-3) --- */
#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND                                                              \
	do {                                                                   \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                     \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                     \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)

/* Absorb `words` whole words of `m` into the state v0..v3, c_rounds rounds each. */
#define SIP_ABSORB(m, words, c_rounds)                                         \
	do {                                                                   \
		_Pragma("unroll") for (int i = 0; i < (words); i++) {           \
			v3 ^= (m)[i];                                          \
			_Pragma("unroll") for (int r = 0; r < (c_rounds); r++) \
				SIP_ROUND;                                     \
			v0 ^= (m)[i];                                          \
		}                                                              \
	} while (0)

/* SipHash's state after some whole words: a message whose first words are fixed for a while (the
 * encapsulation's outer addresses) is hashed from the state after them (front.bpf.c's route cache). */
struct siphash_state {
	__u64 v0, v1, v2, v3;
};

/* The state after `words` words of `m` under `key`, c rounds each. */
static __always_inline void siphash_start(struct siphash_state *state, const __u64 *m, int words, int c_rounds,
					  const __u8 key[16])
{
	__u64 k0, k1;

	__builtin_memcpy(&k0, key, 8);
	__builtin_memcpy(&k1, key + 8, 8);
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
	SIP_ABSORB(m, words, c_rounds);
	*state = (struct siphash_state){v0, v1, v2, v3};
}

/* SipHash-c-d of a message of `total` whole words, from the state after its first total - `words` words
 * (siphash_start), `m` its last `words` words. */
static __always_inline __u64 siphash_finish(const struct siphash_state *state, const __u64 *m, int words,
					    int total, int c_rounds, int d_rounds)
{
	__u64 v0 = state->v0, v1 = state->v1, v2 = state->v2, v3 = state->v3;

	SIP_ABSORB(m, words, c_rounds);
	/* The final block is empty but for the length byte: the message is whole words. */
	__u64 b = (__u64)(total * 8) << 56;
	v3 ^= b;
#pragma unroll
	for (int r = 0; r < c_rounds; r++)
		SIP_ROUND;
	v0 ^= b;
	v2 ^= 0xff;
#pragma unroll
	for (int r = 0; r < d_rounds; r++)
		SIP_ROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/* SipHash-c-d of `words` 64-bit words, the 64-bit output as the kernel's siphash() returns it (and the
 * Python siphash24 package's siphash24/siphash13 intdigest()). Every argument but m and key is a
 * constant at each call, so the rounds unroll. */
static __always_inline __u64 siphash_words(const __u64 *m, int words, int c_rounds, int d_rounds,
					   const __u8 key[16])
{
	struct siphash_state state;

	siphash_start(&state, m, 0, c_rounds, key);
	return siphash_finish(&state, m, words, words, c_rounds, d_rounds);
}

/* SipHash-2-4 of the 48-byte cookie message. */
static __always_inline __u64 siphash24_48(const __u64 m[COOKIE_MAC_INPUT_BYTES / 8], const __u8 key[16])
{
	return siphash_words(m, COOKIE_MAC_INPUT_BYTES / 8, 2, 4, key);
}

/* A 32-bit one's-complement sum (bpf_csum_diff's) folded to the 16-bit checksum field's value. */
static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* 32-bit words read from memory written as header fields (struct iphdr's, a TCP header's): clang's -O2
 * assumes strict aliasing, and without this it moved the fields' 16-bit stores past the word loads (no
 * helper call orders them). */
typedef __u32 __attribute__((__may_alias__)) header_word;

/* An IPv4 header's (20 bytes, no options) one's-complement sum, folded: 0 when its checksum holds, the
 * checksum to write when the field is 0. Five loads where bpf_csum_diff is a helper call: ~20 ns less
 * per forwarded packet (benchmarks/front_xdp_cost.py). */
static __always_inline __u16 ipv4_header_fold(const struct iphdr *ip)
{
	const header_word *words = (const void *)ip;

	return fold((__u64)words[0] + words[1] + words[2] + words[3] + words[4]);
}

/* A TCP segment of the (inner) packet, addresses in the MAC message's 16-byte form. */
struct segment {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 seq;
	__u32 ack;
	__u32 tcp_offset; /* from the start of the Ethernet header */
	__u32 tcp_length; /* header with options */
	__u32 ip_length;  /* the IP packet's own length field: header(s) and payload (IPv6: 40 + payload) */
	__u8 family;      /* 4 or 6 */
	__u8 flags;       /* TCP flags byte (FIN 0x01 ... CWR 0x80) */
	__u16 vip_port;   /* front: 1 + its VIP and port's element in vip_port_counters, 0 = not counted */
};

/* The 4-tuple of `seg` as a socket lookup takes it (bpf_skc_lookup_tcp): its size in `tuple`. */
static __always_inline __u32 socket_tuple_of(struct bpf_sock_tuple *tuple, const struct segment *seg)
{
	if (seg->family == 4) {
		__builtin_memcpy(&tuple->ipv4.saddr, &seg->saddr[12], 4);
		__builtin_memcpy(&tuple->ipv4.daddr, &seg->daddr[12], 4);
		tuple->ipv4.sport = seg->sport;
		tuple->ipv4.dport = seg->dport;
		return sizeof(tuple->ipv4);
	}
	__builtin_memcpy(tuple->ipv6.saddr, seg->saddr, 16);
	__builtin_memcpy(tuple->ipv6.daddr, seg->daddr, 16);
	tuple->ipv6.sport = seg->sport;
	tuple->ipv6.dport = seg->dport;
	return sizeof(tuple->ipv6);
}

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_ECE 0x40
#define TCP_FLAG_CWR 0x80
#define IP_MF_OR_OFFSET 0x3fff

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WINDOW 3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_TIMESTAMP 8
#define TCPOLEN_MSS 4
#define TCPOLEN_WINDOW 3
#define TCPOLEN_SACK_PERM 2
#define TCPOLEN_TIMESTAMP 10
#define TCP_MAX_OPTION_BYTES 40
#define MAX_OPTIONS_WALKED TCP_MAX_OPTION_BYTES /* each option is at least one byte */

static __always_inline void ipv4_mapped(__u8 out[16], const void *address)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(&out[12], address, 4);
}

/* Is an encapsulation's outer IPv4 header (IHL 5, read in place) one a front or a backend writes for the
 * `ip_bytes` the frame carries behind its Ethernet header: version 4, that total length, its checksum right?
 * The programs run before ip_rcv checks it, and decapsulating skips those checks: the inner packet would carry
 * whatever lay past a shorter total length. docs/backend.md, "What the backend trusts". */
static __always_inline int outer_ipv4_sound(const struct iphdr *ip, __u32 ip_bytes)
{
	return ip->version == 4 && bpf_ntohs(ip->tot_len) == ip_bytes && !ipv4_header_fold(ip);
}

/* What parse_frame() found. */
enum parsed {
	PARSE_OTHER,     /* not IPv4/IPv6 carrying TCP, or an IP header the kernel drops */
	PARSE_SEGMENT,   /* an unfragmented TCP segment: every field of struct segment filled */
	PARSE_UNHANDLED, /* TCP this parser does not walk (an IPv4 fragment, IPv6 extension headers, a
			  * truncated TCP header): only family, saddr and daddr filled */
};

/* IPv6 extension headers (RFC 8200 4, RFC 6564): what may stand between the header and the TCP one. */
static __always_inline int ipv6_extension(__u8 next_header)
{
	return next_header == 0 || next_header == 43 || next_header == 44 || next_header == 50 ||
	       next_header == 51 || next_header == 60 || next_header == 135 || next_header == 139 ||
	       next_header == 140;
}

/* Parse Ethernet + IPv4/IPv6 + TCP at `data`. IPv6 extension headers are not walked: a client's
 * handshake ACK carries none. */
static __always_inline enum parsed parse_frame(void *data, void *data_end, struct segment *seg)
{
	struct ethhdr *eth = data;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > data_end)
		return PARSE_OTHER;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP)
			return PARSE_OTHER;
		ipv4_mapped(seg->saddr, &ip->saddr);
		ipv4_mapped(seg->daddr, &ip->daddr);
		seg->family = 4;
		tcp = (void *)ip + ip->ihl * 4;
		if ((ip->frag_off & bpf_htons(IP_MF_OR_OFFSET)) || (void *)(tcp + 1) > data_end)
			return PARSE_UNHANDLED;
		seg->ip_length = bpf_ntohs(ip->tot_len);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return PARSE_OTHER;
		if (ip6->nexthdr != IPPROTO_TCP && !ipv6_extension(ip6->nexthdr))
			return PARSE_OTHER;
		__builtin_memcpy(seg->saddr, &ip6->saddr, 16);
		__builtin_memcpy(seg->daddr, &ip6->daddr, 16);
		seg->family = 6;
		tcp = (void *)(ip6 + 1);
		if (ip6->nexthdr != IPPROTO_TCP || (void *)(tcp + 1) > data_end)
			return PARSE_UNHANDLED;
		seg->ip_length = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	} else {
		return PARSE_OTHER;
	}
	seg->sport = tcp->source;
	seg->dport = tcp->dest;
	seg->seq = bpf_ntohl(tcp->seq);
	seg->ack = bpf_ntohl(tcp->ack_seq);
	seg->tcp_offset = (void *)tcp - data;
	seg->tcp_length = tcp->doff * 4;
	seg->flags = ((__u8 *)tcp)[13];
	return PARSE_SEGMENT;
}

/* parse_frame() for tc programs: 1 for an unfragmented TCP segment, else 0. */
static __always_inline int parse_segment(struct __sk_buff *skb, struct segment *seg)
{
	return parse_frame((void *)(long)skb->data, (void *)(long)skb->data_end, seg) == PARSE_SEGMENT;
}

#define PROTO_ICMPV6 58
#define ICMP_HEADER_BYTES 8
#define QUOTED_TCP_BYTES 8 /* what every ICMP error quotes of the segment: ports and sequence number */

/* The ICMP errors a host's TCP acts on (packet.ICMP_ERROR_TYPES): IPv4 destination unreachable (3, with
 * "fragmentation needed") and time exceeded (11); ICMPv6 destination unreachable (1), packet too big (2),
 * time exceeded (3). */
static __always_inline int icmp_error_type(__u8 family, __u8 type)
{
	return family == 4 ? type == 3 || type == 11 : type >= 1 && type <= 3;
}

/* packet.parse_icmp_error over the frame at `data`: an ICMP(v6) error that quotes a TCP segment's IP header
 * (of the packet's own family, not a later fragment) and 8 bytes of its TCP header, all inside the IP
 * packet, which is inside the frame. Fills `flow` as the flow's own packets are (saddr and sport the
 * client: the quoted destination; daddr and dport the server), its family and ip_length (the ICMP
 * packet's), and `error` with the error's own addresses. 1 when it is one, else 0. */
static __always_inline int parse_icmp_error(void *data, void *data_end, struct segment *error, struct segment *flow)
{
	struct ethhdr *eth = data;
	__u8 *icmp, *quoted, *ports;
	__u32 header, total;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_ICMP ||
		    (ip->frag_off & bpf_htons(IP_MF_OR_OFFSET)))
			return 0;
		header = ip->ihl * 4;
		total = bpf_ntohs(ip->tot_len);
		if (total < header || (void *)ip + total > data_end)
			return 0;
		ipv4_mapped(error->saddr, &ip->saddr);
		ipv4_mapped(error->daddr, &ip->daddr);
		flow->family = 4;
		icmp = (void *)ip + header;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6 || ip6->nexthdr != PROTO_ICMPV6)
			return 0;
		header = sizeof(*ip6);
		total = header + bpf_ntohs(ip6->payload_len);
		if ((void *)ip6 + total > data_end)
			return 0;
		__builtin_memcpy(error->saddr, &ip6->saddr, 16);
		__builtin_memcpy(error->daddr, &ip6->daddr, 16);
		flow->family = 6;
		icmp = (void *)(ip6 + 1);
	} else {
		return 0;
	}
	flow->ip_length = error->ip_length = total;
	error->family = flow->family;
	/* From here every byte read must lie inside the IP packet (offsets checked against `total`) and,
	 * for the verifier, inside the frame (pointers checked against data_end). */
	quoted = icmp + ICMP_HEADER_BYTES;
	if (header + ICMP_HEADER_BYTES + 1 > total || (void *)(quoted + 1) > data_end ||
	    !icmp_error_type(flow->family, icmp[0]) || quoted[0] >> 4 != flow->family)
		return 0;
	__u32 quoted_header;
	if (flow->family == 4) {
		struct iphdr *inner = (void *)quoted;

		if (header + ICMP_HEADER_BYTES + sizeof(*inner) > total || (void *)(inner + 1) > data_end ||
		    inner->protocol != IPPROTO_TCP || inner->ihl < 5 || (inner->frag_off & bpf_htons(0x1fff)))
			return 0;
		quoted_header = inner->ihl * 4;
		ipv4_mapped(flow->saddr, &inner->daddr);
		ipv4_mapped(flow->daddr, &inner->saddr);
	} else {
		struct ipv6hdr *inner = (void *)quoted;

		if (header + ICMP_HEADER_BYTES + sizeof(*inner) > total || (void *)(inner + 1) > data_end ||
		    inner->nexthdr != IPPROTO_TCP)
			return 0;
		quoted_header = sizeof(*inner);
		__builtin_memcpy(flow->saddr, &inner->daddr, 16);
		__builtin_memcpy(flow->daddr, &inner->saddr, 16);
	}
	ports = quoted + quoted_header;
	if (header + ICMP_HEADER_BYTES + quoted_header + QUOTED_TCP_BYTES > total ||
	    (void *)(ports + QUOTED_TCP_BYTES) > data_end)
		return 0;
	__builtin_memcpy(&flow->dport, ports, 2);
	__builtin_memcpy(&flow->sport, ports + 2, 2);
	flow->flags = 0;
	return 1;
}

union cookie_message {
	__u8 bytes[COOKIE_MAC_INPUT_BYTES];
	__u64 words[COOKIE_MAC_INPUT_BYTES / 8];
};


/* The 48 bytes the MAC covers: addresses (16-byte form), ports, the client's ISN, the epoch's low 32 bits
 * and the data bits, big endian (docs/cookie.md). */
static __always_inline void cookie_message_of(union cookie_message *message, const struct segment *seg,
					      __u32 client_isn, __u64 epoch, __u32 data)
{
	__u32 client_isn_be = bpf_htonl(client_isn);
	__u32 epoch_be = bpf_htonl((__u32)epoch);
	__u16 data_be = bpf_htons((__u16)data);

	__builtin_memset(message, 0, sizeof(*message));
	__builtin_memcpy(&message->bytes[0], seg->saddr, 16);
	__builtin_memcpy(&message->bytes[16], seg->daddr, 16);
	__builtin_memcpy(&message->bytes[32], &seg->sport, 2);
	__builtin_memcpy(&message->bytes[34], &seg->dport, 2);
	__builtin_memcpy(&message->bytes[36], &client_isn_be, 4);
	__builtin_memcpy(&message->bytes[40], &epoch_be, 4);
	__builtin_memcpy(&message->bytes[44], &data_be, 2);
}

union encap_message {
	__u8 bytes[ENCAP_MAC_INPUT_BYTES];
	__u64 words[ENCAP_MAC_INPUT_BYTES / 8];
};

/* The 56 bytes the encapsulation's MAC covers (docs/backend.md): outer source and destination, the
 * inner addresses (16-byte form) and ports, the header's flags, three zero bytes, the former owners. */
static __always_inline void encap_message_of(union encap_message *message, __be32 outer_saddr,
					     __be32 outer_daddr, const struct segment *seg, __u8 flags,
					     const struct former_owners *former)
{
	__builtin_memset(message, 0, sizeof(*message));
	__builtin_memcpy(&message->bytes[0], &outer_saddr, 4);
	__builtin_memcpy(&message->bytes[4], &outer_daddr, 4);
	__builtin_memcpy(&message->bytes[8], seg->saddr, 16);
	__builtin_memcpy(&message->bytes[24], seg->daddr, 16);
	__builtin_memcpy(&message->bytes[40], &seg->sport, 2);
	__builtin_memcpy(&message->bytes[42], &seg->dport, 2);
	message->bytes[44] = flags;
	__builtin_memcpy(&message->bytes[48], former, sizeof(*former));
}

static __always_inline __u64 encap_mac(const union encap_message *message, const __u8 key[16])
{
	return siphash_words(message->words, ENCAP_MAC_INPUT_BYTES / 8, 2, 4, key);
}

/* Is `epoch` accepted at `now_ns` (wall-clock ns)? The window of SaltSchedule.accepted_epochs
 * (synproxy/salt.py): [floor((now - period - skew) / period), floor((now + skew) / period)]. Each program
 * judges by its own clock: salts a dead loader left in the map would otherwise stay valid for ever. */
static __always_inline int epoch_accepted(__u64 epoch, __u64 now_ns, __u64 period_ns, __u64 skew_ns)
{
	__u64 reach_ns = period_ns + skew_ns;

	if (!period_ns)
		return 0;
	if (epoch < (now_ns > reach_ns ? (now_ns - reach_ns) / period_ns : 0))
		return 0;
	return epoch <= (now_ns + skew_ns) / period_ns;
}

/* The salt slot an ACK's cookie names by its epoch bits, or 0 when the loader wrote none there; whether
 * that slot's epoch is accepted now is epoch_accepted's question. */
static __always_inline const struct salt_slot *cookie_slot(__u32 cookie)
{
	__u32 index = (cookie >> COOKIE_EPOCH_SHIFT) & (COOKIE_EPOCH_SLOTS - 1);
	const struct salt_slot *slot = bpf_map_lookup_elem(&salts, &index);

	return slot && slot->valid ? slot : 0;
}

/* Does `cookie` (an ACK's ack number minus one) carry a valid MAC for this segment under one of the
 * slot's salts? (docs/cookie.md) */
static __always_inline int cookie_mac_valid(const struct salt_slot *slot, const struct segment *seg, __u32 cookie)
{
	union cookie_message message;

	cookie_message_of(&message, seg, seg->seq - 1, slot->epoch, cookie & COOKIE_DATA_MASK);
#pragma unroll
	for (__u32 i = 0; i < MAX_SECRETS; i++) {
		if (i < slot->nkeys &&
		    (siphash24_48(message.words, slot->keys[i]) & COOKIE_MAC_MASK) == cookie >> COOKIE_DATA_BITS)
			return 1;
	}
	return 0;
}

/* maglev.flow_hash: SipHash-1-3 of the addresses (16-byte form), the ports and 4 zero bytes, the same on
 * every front, which share the flow key. Not a wire format (only fronts compute it, each for itself):
 * the lighter SipHash-1-3, a keyed hash still, keeps an attacker from aiming 4-tuples at one backend at
 * about half the rounds (benchmarks/front_xdp_cost.py). */
#define FLOW_HASH_INPUT_BYTES 40
static __always_inline __u64 flow_hash(const struct segment *seg, const __u8 key[16])
{
	union {
		__u8 bytes[FLOW_HASH_INPUT_BYTES];
		__u64 words[FLOW_HASH_INPUT_BYTES / 8];
	} message;

	__builtin_memcpy(&message.bytes[0], seg->saddr, 16);
	__builtin_memcpy(&message.bytes[16], seg->daddr, 16);
	__builtin_memcpy(&message.bytes[32], &seg->sport, 2);
	__builtin_memcpy(&message.bytes[34], &seg->dport, 2);
	__builtin_memset(&message.bytes[36], 0, 4);
	return siphash_words(message.words, FLOW_HASH_INPUT_BYTES / 8, 1, 3, key);
}
_Static_assert(sizeof(struct encap_header) == ENCAP_OVERHEAD - 28, "outer IPv4 + UDP + header");

#endif
