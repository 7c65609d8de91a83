/* Shared definitions of the synproxy BPF programs: the cookie (docs/cookie.md), the front -> backend
 * encapsulation (docs/backend.md), SipHash-2-4, and the map value layouts that
 * synproxy/backend/loader.py packs. Needs only the uapi headers and libbpf's bpf_helpers.h: no
 * vmlinux.h, so building needs no bpftool. */
#ifndef SYNPROXY_H
#define SYNPROXY_H

#include <linux/types.h>

/* --- cookie layout: MAC 31..10 | epoch 9..8 | wscale 7..4 | SACK 3 | ECN 2 | MSS index 1..0 --- */
#define COOKIE_DATA_BITS 10
#define COOKIE_DATA_MASK 0x3ffu
#define COOKIE_MAC_MASK 0x3fffffu
#define COOKIE_EPOCH_SHIFT 8
#define COOKIE_EPOCH_SLOTS 4
#define COOKIE_WSCALE_SHIFT 4
#define COOKIE_WSCALE_NONE 15
#define COOKIE_SACK_BIT (1u << 3)
#define COOKIE_ECN_BIT (1u << 2)
#define COOKIE_MSS_MASK 0x3u
#define COOKIE_MAC_INPUT_BYTES 48

/* The Linux kernel's own SYN-cookie MSS tables. */
static const __u16 mss_table_v4[4] = {536, 1300, 1440, 1460};
static const __u16 mss_table_v6[4] = {1220, 1420, 1440, 8940};

/* --- encapsulation: outer IPv4 (20) + UDP (8) + this header (4) --- */
#define ENCAP_MAGIC 0x5c
#define ENCAP_FLAG_VALIDATED 0x01
#define ENCAP_OVERHEAD 32

struct encap_header {
	__u8 magic;
	__u8 flags;
	__u16 reserved; /* zero */
};

/* bpf_skb_adjust_room flags (Linux 6.3) that also set skb->protocol to the inner family; the 6.1 uapi
 * headers Debian 12 ships do not name them yet. */
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

/* --- map values --- */
#define MAX_SECRETS 2

struct backend_config {
	__u16 encap_port;   /* host order */
	__u8 server_wscale; /* the window scale the fronts announce; the kernel's rcv_wscale */
	__u8 pad;
};

struct salt_slot {          /* one per epoch mod 4 */
	__u32 valid;
	__u32 nkeys;        /* primary secret first, then a retired one while rotating */
	__u64 epoch;        /* its low 32 bits enter the MAC */
	__u8 keys[MAX_SECRETS][16];
};

/* Indices of the per-CPU `counters` map; synproxy/backend/loader.py names them in this order. */
enum counter {
	COUNTER_PASSED,            /* not encapsulated: left alone */
	COUNTER_DECAPSULATED,      /* from a trusted front, header removed */
	COUNTER_UNTRUSTED,         /* encapsulated, but not from a trusted front: dropped */
	COUNTER_MALFORMED,         /* encapsulated, but the header or inner version is wrong: dropped */
	COUNTER_COOKIE_BAD,        /* flagged VALIDATED, but no accepted salt gives its MAC: dropped */
	COUNTER_NO_SOCKET,         /* valid cookie, nothing listens on the tuple */
	COUNTER_NOT_LISTENER,      /* valid cookie, a connection already exists (a retransmitted ACK) */
	COUNTER_CREATED,           /* the kfunc made a request socket: a connection is born */
	COUNTER_KFUNC_FAILED,      /* the kfunc refused (see kfunc_errors by errno) */
	COUNTER_SYN_RECEIVED,      /* TCP SYNs that reached this backend (should stay 0 behind fronts) */
	COUNTER_MAX,
};
#define KFUNC_ERRNO_SLOTS 64

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

/* --- SipHash-2-4 over the fixed 48-byte cookie message (six little-endian words) --- */
#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND                                                              \
	do {                                                                   \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                     \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                     \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)

/* The 64-bit output as the kernel's siphash() returns it (and the Python siphash24 intdigest()). */
static __always_inline __u64 siphash24_48(const __u64 m[COOKIE_MAC_INPUT_BYTES / 8], const __u8 key[16])
{
	__u64 k0, k1;

	__builtin_memcpy(&k0, key, 8);
	__builtin_memcpy(&k1, key + 8, 8);
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
#pragma unroll
	for (int i = 0; i < COOKIE_MAC_INPUT_BYTES / 8; i++) {
		v3 ^= m[i];
		SIP_ROUND;
		SIP_ROUND;
		v0 ^= m[i];
	}
	/* The final block is empty but for the length byte: 48 is a multiple of 8. */
	__u64 b = (__u64)COOKIE_MAC_INPUT_BYTES << 56;
	v3 ^= b;
	SIP_ROUND;
	SIP_ROUND;
	v0 ^= b;
	v2 ^= 0xff;
	SIP_ROUND;
	SIP_ROUND;
	SIP_ROUND;
	SIP_ROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

#endif
