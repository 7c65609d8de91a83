/* Shared definitions of the synproxy BPF programs: the cookie (docs/cookie.md), the front -> backend
 * encapsulation (docs/backend.md), SipHash-2-4, and the maps' value layouts the Python loader mirrors
 * (synproxy/backend/maps.py). */
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

static const __u16 mss_table_v4[4] = {536, 1300, 1440, 1460};
static const __u16 mss_table_v6[4] = {1220, 1420, 1440, 8940};

/* --- encapsulation: outer IPv4 (20) + UDP (8) + this header (4) --- */
#define ENCAP_MAGIC 0x5c
#define ENCAP_FLAG_VALIDATED 0x01
#define ENCAP_OVERHEAD 32

struct encap_header {
	__u8 magic;
	__u8 flags;
	__u16 reserved;
};

/* --- maps' values --- */
#define MAX_SECRETS 2

struct backend_config {
	__u16 encap_port;   /* host order */
	__u8 server_wscale; /* the window scale the fronts announce */
	__u8 pad;
};

struct salt_slot {          /* one per epoch mod 4 */
	__u32 valid;
	__u32 nkeys;        /* primary secret first, then a retired one while rotating */
	__u64 epoch;
	__u8 keys[MAX_SECRETS][16];
};

enum counter {
	COUNTER_PASSED,            /* not encapsulated: left alone */
	COUNTER_DECAPSULATED,      /* from a trusted front, header removed */
	COUNTER_UNTRUSTED,         /* encapsulated, but not from a trusted front: dropped */
	COUNTER_MALFORMED,         /* encapsulated, but the header is wrong: dropped */
	COUNTER_COOKIE_BAD,        /* flagged VALIDATED, but the MAC does not hold: dropped */
	COUNTER_NO_SOCKET,         /* valid cookie, nothing listens on the tuple */
	COUNTER_NOT_LISTENER,      /* valid cookie, a connection already exists (a retransmitted ACK) */
	COUNTER_CREATED,           /* the kfunc made a request socket: a connection is born */
	COUNTER_KFUNC_FAILED,      /* the kfunc refused (see kfunc_errors by errno) */
	COUNTER_SYN_RECEIVED,      /* TCP SYNs that reached this backend (should stay 0 behind fronts) */
	COUNTER_UNSUPPORTED,       /* encapsulated IPv6 in IPv4: not handled yet, dropped */
	COUNTER_MAX,
};
#define KFUNC_ERRNO_SLOTS 64

/* The kernel's struct bpf_tcp_req_attrs (net/core/filter.c); attrs__sz must be its size, 20. */
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

/* --- SipHash-2-4 over the fixed 48-byte cookie message (six little-endian words) --- */
#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND                                                              \
	do {                                                                   \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                     \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                     \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)

static __always_inline __u64 siphash24_48(const __u64 m[6], const __u8 key[16])
{
	__u64 k0, k1;
	__builtin_memcpy(&k0, key, 8);
	__builtin_memcpy(&k1, key + 8, 8);
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
#pragma unroll
	for (int i = 0; i < 6; i++) {
		v3 ^= m[i];
		SIP_ROUND;
		SIP_ROUND;
		v0 ^= m[i];
	}
	__u64 b = 48ULL << 56;
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
