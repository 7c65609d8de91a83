// SPDX-License-Identifier: GPL-2.0
/* The front's data plane, two entry points over one set of maps and one SYN-ACK builder:
 *
 * - synproxy_front (tc ingress, direct action): answers a plain SYN to a protected VIP and port with the
 *   cookie SYN-ACK, built in place and sent back out through the FIB; everything else continues to the
 *   NFQUEUE and the Python front.
 * - synproxy_front_xdp (XDP): the same SYN-ACK, and every other segment to a protected VIP and port
 *   encapsulated to its Maglev backend as encap.encapsulate builds it, flagged VALIDATED when it is a
 *   handshake ACK whose cookie holds.
 *
 * Both handle only what they can handle byte for byte as synproxy/front/handler.py would (docs/front.md);
 * the rest is passed on unchanged and counted, and the queue decides. */
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <linux/udp.h>

#include "synproxy.h"

#define AF_INET 2
#define AF_INET6 10
#define SYN_ACK_WINDOW 65535
#define SYN_ACK_TTL 64
#define ENCAP_TTL 64
#define MAX_TCP_HEADER 60
#define ENCAP_SOURCE_PORT_BASE 0xc000 /* the flow hash's low 14 bits follow */
#define ENCAP_SOURCE_PORT_MASK 0x3fff
#define IP_DF 0x4000

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct front_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* see struct front_forwarding: replaced whole */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct front_forwarding);
} forwarding SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAGLEV_TABLE_SIZE);
	__type(key, __u32);
	__type(value, struct maglev_owners);
} maglev SEC(".maps");

/* The protected VIPs as an open-addressing table: an array of the copy's, looked up inline (a 16-byte
 * hash map's lookup cost ~35 ns a packet, benchmarks/front_xdp_stages.py). A VIP sits within
 * VIP_PROBES elements of vip_index(); one that found no room there (hundreds of VIPs) sets
 * vips_overflow, and a VIP the table does not hold is then looked up in `protected_vips` too. */
#define VIP_TABLE_BITS 9
#define VIP_TABLE_SLOTS (1 << VIP_TABLE_BITS)
#define VIP_PROBES 4
struct vip_entry {
	__u64 address[2]; /* the 16-byte form, as it lies in memory */
	__u8 slot;        /* protected_vips' value: the VIP's number for the per-VIP counters (0: none) */
	__u8 used;
	__u8 pad[6];
};

/* The route back to clients the control plane proved (synproxy/front/routes_back.py, docs/front.md, "The
 * SYN-ACK's way back"): with the kernel's default policy rules and one single-nexthop default route via a
 * gateway, every client address outside the routes other than the default one (the `exceptions`, each
 * prefix as a network and a mask in the 16-byte form) is routed to that gateway, so one bpf_fib_lookup
 * (for `probe`, an address outside them) answers for all of them. Family [0] IPv4, [1] IPv6; not
 * `enabled` (or no element): every SYN's own lookup, as without the shortcut. */
#define ROUTE_BACK_EXCEPTIONS 32
struct route_back_prefix {
	__u64 network[2];
	__u64 mask[2];
};

struct route_back_family {
	__u32 enabled;
	__u32 exceptions_count;
	__u8 probe[16];
	struct route_back_prefix exceptions[ROUTE_BACK_EXCEPTIONS];
};

struct route_back_proof {
	struct route_back_family family[2];
};

/* Written by the loader, replaced whole under RCU (not preallocated: a replaced element is not reused
 * under a reader), then a new `config` generation: the CPUs copy it with the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct route_back_proof);
} route_proof SEC(".maps");

/* How long a CPU keeps a route it looked up (to a backend; back to the clients, the probe's), on the
 * jiffies clock: bpf_jiffies64 is inlined by the JIT (a load, no helper call), so a packet whose cookie
 * needs no clock (FIN, RST, data without ACK, an ICMP error, a TFO SYN) reads none, where the TAI helper
 * cost it ~60 ns (docs/front.md, "Its own cost"). 10 ticks: 100 ms at HZ=100, the lowest rate Linux
 * builds with, 40 ms at this VM's 250, 10 at 1000 (one lookup per 10 ms per CPU and backend costs little).
 * Not CONFIG_HZ by a __kconfig extern: libbpf then refuses to load without /proc/config.gz or
 * /boot/config-*, which a container often lacks. */
#define ROUTE_CACHE_JIFFIES 10

/* The probe's lookup, per CPU, family and ingress interface (the lookup is the forwarding of a packet that
 * came in there: the interface's forwarding setting counts), used for ROUTE_CACHE_JIFFIES and under the
 * copy's generation only. */
#define NEXT_HOP_BACK_SLOTS 4
struct next_hop_back {
	__u64 checked_jiffies; /* bpf_jiffies64() of the lookup */
	__u64 generation; /* the copy's when looked up; 0: empty */
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

/* Each CPU's copy of the `forwarding` element, the `salts` slots, the `protected_vips` and the
 * `route_proof`, as of config's generation (with the next hops back it looked up under it): the hash lookups (20-50 ns each, benchmarks/front_xdp_stages.py) a packet made
 * become one inlined per-CPU array lookup and a compare. The loader writes the maps first, then a new
 * generation in `config`; a CPU whose copy is of another generation copies them again before using
 * them, so no copy is used after the packet that first sees the new generation. A generation is
 * random, not counted: a reader racing the loader's in-place write of `config` could read a mix of two,
 * which then never comes back. */
struct local_copy {
	__u64 generation;    /* config's when copied; 0: never */
	__u32 has_forwarding;
	__u32 vips_overflow;
	struct front_forwarding forwarding;
	struct salt_slot salts[COOKIE_EPOCH_SLOTS]; /* a slot absent from the map: zeroed (not valid) */
	struct vip_entry vips[VIP_TABLE_SLOTS];     /* protected_vips */
	struct route_back_proof route_back;         /* zeroed (disabled) without the map's element */
	struct next_hop_back next_hops_back[2][NEXT_HOP_BACK_SLOTS]; /* written by the SYN path */
};

/* Where a VIP's probes start in the copy's table: Knuth's multiplicative hash of its words. */
static __always_inline __u32 vip_index(const __u8 address[16])
{
	const header_word *words = (const void *)address;

	return ((words[0] ^ words[1] ^ words[2] ^ words[3]) * 2654435761u) >> (32 - VIP_TABLE_BITS);
}

/* The callbacks' context (bpf_loop and bpf_for_each_map_elem take one on the stack). */
struct vip_refill {
	struct local_copy *copy;
};

static long clear_vip_entry(__u32 index, void *context)
{
	struct local_copy *copy = ((struct vip_refill *)context)->copy;

	if (copy)
		copy->vips[index & (VIP_TABLE_SLOTS - 1)].used = 0;
	return 0;
}

/* bpf_for_each_map_elem's callback over protected_vips: the VIP into the copy's table. */
static long insert_vip(void *map, const __u8 *address, const __u8 *slot, void *context)
{
	struct local_copy *copy = ((struct vip_refill *)context)->copy;
	__u32 index = vip_index(address);

	if (!copy)
		return 1;
#pragma unroll
	for (__u32 probe = 0; probe < VIP_PROBES; probe++) {
		struct vip_entry *entry = &copy->vips[(index + probe) & (VIP_TABLE_SLOTS - 1)];

		if (!entry->used) {
			__builtin_memcpy(entry->address, address, 16);
			entry->slot = *slot;
			entry->used = 1;
			return 0;
		}
	}
	copy->vips_overflow = 1;
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct local_copy);
} local_copies SEC(".maps");

/* The copy's refill: its own BPF function, called from the entry's frame (the SYN path's stack is
 * full) and kept out of the hot path's code. */
static __noinline int copy_maps(struct local_copy *copy, __u64 generation)
{
	__u32 zero = 0;
	const struct front_forwarding *fwd = bpf_map_lookup_elem(&forwarding, &zero);

	if (!copy)
		return 0;
	copy->has_forwarding = fwd != 0;
	if (fwd)
		copy->forwarding = *fwd;
#pragma unroll
	for (__u32 i = 0; i < COOKIE_EPOCH_SLOTS; i++) {
		__u32 index = i;
		const struct salt_slot *slot = bpf_map_lookup_elem(&salts, &index);

		if (slot)
			copy->salts[i] = *slot;
		else
			__builtin_memset(&copy->salts[i], 0, sizeof(copy->salts[i]));
	}
	/* Word by word: clang inlines no memcpy this long. */
	const __u64 *proof = bpf_map_lookup_elem(&route_proof, &zero);
	__u64 *proof_copy = (__u64 *)&copy->route_back;
	for (__u32 i = 0; i < sizeof(copy->route_back) / 8; i++)
		proof_copy[i] = proof ? proof[i] : 0;
	struct vip_refill refill = {copy};
	copy->vips_overflow = 0;
	bpf_loop(VIP_TABLE_SLOTS, clear_vip_entry, &refill, 0);
	bpf_for_each_map_elem(&protected_vips, insert_vip, &refill, 0);
	copy->generation = generation;
	return 1;
}

/* This CPU's copy, current with `cfg`'s generation; NULL for generation 0, which the loader never writes
 * (a reader racing the configuration's first write may see it): the packet is the queue's, uncounted,
 * as before any configuration, where copying the maps for every such packet would go unseen. */
static __always_inline struct local_copy *local_copy(const struct front_config *cfg)
{
	__u32 zero = 0;
	struct local_copy *copy = bpf_map_lookup_elem(&local_copies, &zero);
	__u64 generation = *(volatile const __u64 *)&cfg->generation;

	if (!copy || !generation)
		return 0;
	if (copy->generation == generation)
		return copy;
	return copy_maps(copy, generation) ? copy : 0;
}

/* protected_vips' value for `address` (its number for the per-VIP counters), or NULL: not protected. */
static __always_inline const __u8 *protected_vip(const struct local_copy *copy, const __u8 address[16])
{
	__u32 index = vip_index(address);
	__u64 words[2];

	__builtin_memcpy(words, address, 16);
#pragma unroll
	for (__u32 probe = 0; probe < VIP_PROBES; probe++) {
		const struct vip_entry *entry = &copy->vips[(index + probe) & (VIP_TABLE_SLOTS - 1)];

		if (!entry->used)
			break;
		if (entry->address[0] == words[0] && entry->address[1] == words[1])
			return &entry->slot;
	}
	return copy->vips_overflow ? bpf_map_lookup_elem(&protected_vips, address) : 0;
}

/* The copy's forwarding element, or NULL when the loader has written none. */
static __always_inline const struct front_forwarding *copied_forwarding(const struct local_copy *copy)
{
	return copy->has_forwarding ? &copy->forwarding : 0;
}

/* The next hop to a backend, as bpf_fib_lookup gave it, per CPU: the lookup costs ~200 ns of a forwarded
 * packet's ~750 (benchmarks/front_xdp_cost.py), and the farm's routes change far more rarely than every
 * ROUTE_CACHE_JIFFIES. A direct-mapped array (an array lookup is inlined; a hash map's costs about as much
 * as it saves), each slot tagged with what it holds. */
#define ROUTE_CACHE_SLOTS 256
struct route {
	__u64 checked_jiffies; /* bpf_jiffies64() of the lookup; 0: empty */
	__be32 backend;   /* the tag: for this backend */
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

/* A cached route, and the encapsulation MAC's SipHash state after the message's first word (the outer
 * addresses: the farm's and this backend's), then after its second too when that is zero (an IPv4
 * client's, the first 8 bytes of its 16-byte form): 2 or 4 of the MAC's 20 rounds, done once per route
 * lookup. Under the forwarding element of `generation` (its encap key and farm address). */
struct route_entry {
	struct route route;
	__u64 generation;                /* the local copy's when computed */
	struct siphash_state encap_mac[2]; /* [1]: for an IPv4 client */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ROUTE_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct route_entry);
} routes SEC(".maps");

/* A budget's price, written by the loader: what a token costs and the most credit a CPU holds
 * (loading.per_cpu_token_bucket); each CPU's bucket is in a per-CPU map (token_take). */
struct token_limit {
	__u64 cost_ns;
	__u64 credit_max_ns;
};

/* The ICMP errors the programs forward (handler.ICMP_ERRORS_PER_SECOND). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_limit);
} icmp_limit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_bucket);
} icmp_budget SEC(".maps");

/* What the tc program leaves to the queue (front.queue_packets_per_second; no limit while the cost is 0:
 * a loader that never wrote one). The tc program is the last hook before the queue's rule and sees every
 * packet the XDP program passes, which decides alike, so a queued packet takes one token, at tc. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_limit);
} queue_limit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_bucket);
} queue_budget SEC(".maps");

/* By program (enum front_path), outcome and IP version: both programs may see one packet (a SYN XDP passes
 * because its neighbour is unresolved is answered at tc), so each counts its own. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FRONT_PATH_MAX * FRONT_COUNTER_MAX * 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Per protected VIP and port, both programs together: what an operator asks per service (docs/metrics.md,
 * synproxy_front_vip_packets_total). The front's loader numbers its VIPs and ports 1..VIP_PORT_SLOTS in
 * the values of protected_vips and protected_port_slots (past them: not counted), which handle_frame looks up anyway,
 * and handle_frame notes the pair's element in the segment: counting then costs an array element, where
 * a hash keyed by VIP and port cost 50-90 ns a packet (docs/metrics.md). */
#define VIP_PORT_SLOTS 64
#define PORT_UNCOUNTED 0xff /* protected_port_slots: a protected port past VIP_PORT_SLOTS */

/* The protected ports (key: the port, host order), each with its slot: 0 not protected, 1..VIP_PORT_SLOTS,
 * or PORT_UNCOUNTED. An array the front's loader writes, where the backends' `protected_ports` hash
 * (bpf/backend_maps.h) cost a helper call, 20-50 ns a packet: the verifier inlines an array lookup.
 * 64 K elements of 8 bytes (an array's element size): 512 KB. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} protected_port_slots SEC(".maps");

struct vip_port_counts {
	__u64 syn_answered;
	__u64 validated;
	__u64 forwarded; /* FRONT_FORWARDED and both FRONT_FORWARDED_* */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VIP_PORT_SLOTS * VIP_PORT_SLOTS); /* (VIP's slot - 1) * VIP_PORT_SLOTS + port's - 1 */
	__type(key, __u32);
	__type(value, struct vip_port_counts);
} vip_port_counters SEC(".maps");

static __always_inline void count_vip_port(const struct segment *seg, __u32 outcome)
{
	__u32 index = seg->vip_port - 1;
	struct vip_port_counts *counts;

	if (!seg->vip_port || !(counts = bpf_map_lookup_elem(&vip_port_counters, &index)))
		return;
	if (outcome == FRONT_SYN_ANSWERED)
		counts->syn_answered += 1;
	else if (outcome == FRONT_VALIDATED)
		counts->validated += 1;
	else
		counts->forwarded += 1;
}

static __always_inline __u32 counter_index(__u32 path, __u8 family, __u32 outcome)
{
	return (path * FRONT_COUNTER_MAX + outcome) * 2 + (family == 6);
}

static __always_inline void count_index(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1;
}

/* What the tc program leaves to the queue (``index``: its counter), within this CPU's share of the queue's
 * budget (queue_limit); beyond it, dropped and counted queue_rate_limited. A call whose frame stays within
 * 16 bytes (one argument, four values live across token_take's clock read): inlined, or with more to
 * spill, it took the deepest chain of calls (the tc entry, answer_syn, this) past the verifier's 512. */
static __noinline int queue_or_drop(__u32 index)
{
	__u32 zero = 0;
	const struct token_limit *limit = bpf_map_lookup_elem(&queue_limit, &zero);
	int within = !limit || !limit->cost_ns ||
		     token_take(bpf_map_lookup_elem(&queue_budget, &zero), limit->cost_ns, limit->credit_max_ns);

	if (!within) /* the same family, counted queue_rate_limited */
		index = counter_index(FRONT_PATH_TC, (index & 1) ? 6 : 4, FRONT_QUEUE_RATE_LIMITED);
	count_index(index);
	return within ? TC_ACT_OK : TC_ACT_SHOT;
}

/* The outcomes whose packet a program passes on to the queue (enum front_counter). */
static __always_inline int left_to_queue(__u32 outcome)
{
	return outcome == FRONT_QUEUED || outcome == FRONT_UNVERIFIED || outcome == FRONT_NO_SALT ||
	       outcome == FRONT_UNROUTED || outcome == FRONT_UNSENT || outcome == FRONT_TOO_BIG ||
	       outcome == FRONT_UNPARSED;
}

/* Counts the packet's outcome and returns its verdict (queue_or_drop's for what tc leaves to the queue). */
static __always_inline int count_on(__u32 path, const struct segment *seg, __u32 outcome, int verdict)
{
	if (path == FRONT_PATH_TC && verdict == TC_ACT_OK && left_to_queue(outcome))
		return queue_or_drop(counter_index(path, seg->family, outcome));
	count_index(counter_index(path, seg->family, outcome));
	if (outcome == FRONT_SYN_ANSWERED || (outcome >= FRONT_VALIDATED && outcome <= FRONT_FORWARDED_EXPIRED_EPOCH))
		count_vip_port(seg, outcome);
	return verdict;
}

static __always_inline int count(const struct segment *seg, __u32 outcome, int verdict)
{
	return count_on(FRONT_PATH_TC, seg, outcome, verdict);
}

static __always_inline int count_xdp(const struct segment *seg, __u32 outcome, int verdict)
{
	return count_on(FRONT_PATH_XDP, seg, outcome, verdict);
}

/* --- TCP Fast Open (docs/cookie.md, "TCP Fast Open"; handler._fastopen_decision) ---
 *
 * The programs answer a SYN's TFO cookie request with the cookie the backends' kernels make (SipHash-2-4
 * of the client's and the VIP's addresses under the farm's primary key: ~20 ns for IPv4, ~40 for IPv6
 * here, no AES since Linux 5.10). A SYN that carries a cookie gets the handler's decision: valid for the
 * primary or the backup key, with data, small enough to encapsulate and within its source's budget
 * (fastopen_budget, FastOpenLimit's bucket), it is encapsulated whole, flagged FASTOPEN, to the flow's
 * backend; else it gets the cookie SYN-ACK (its data ignored, as the kernel's own SYN cookies do) and
 * the fallback is counted by reason. */
#define TCPOPT_FASTOPEN 34
#define TCPOPT_EXPERIMENTAL 254
#define TCPOPT_FASTOPEN_MAGIC 0xf989
#define TCPOLEN_EXPERIMENTAL_REQUEST 4
#define FASTOPEN_COOKIE_BYTES 8
#define FASTOPEN_OPTION_BYTES 12 /* either form, padded to a multiple of 4 as Linux writes it */

/* What a SYN's TFO options carry (struct syn_options.fastopen), as packet.parse_tcp_options reads them:
 * the last one read wins (an odd cookie length is ignored, a length outside 4..16 cancels it). */
enum fastopen_ask {
	FASTOPEN_NONE,
	FASTOPEN_REQUEST,              /* kind 34, no cookie */
	FASTOPEN_REQUEST_EXPERIMENTAL, /* kind 254 + 0xF989, no cookie */
	FASTOPEN_COOKIE,               /* kind 34 with a cookie (syn_options.fastopen_cookie if 8 bytes long) */
	FASTOPEN_COOKIE_EXPERIMENTAL,  /* kind 254 + 0xF989 with one */
};

/* The farm's TFO keys (tfo.py: fastopen_keys) and the per-source budget (handler.FASTOPEN_PER_SOURCE_*),
 * written by the loader when tfo.enabled (absent: no cookie offered nor accepted, as the handler without
 * tfo_secret); one element, key 0, replaced whole. */
struct fastopen_key {
	__u64 period_ns;  /* tfo.key_period_seconds */
	__u64 key_period; /* the period number `primary` belongs to: another one now leaves the SYN to the queue */
	__u8 primary[16]; /* makes cookies; a cookie is accepted for either key */
	__u8 backup[16];  /* the previous period's */
	__u64 budget_cost_ns;   /* one TFO SYN of a source: 1 s / FASTOPEN_PER_SOURCE_RATE */
	__u64 budget_credit_ns; /* the most a source holds: FASTOPEN_PER_SOURCE_BURST such costs */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fastopen_key);
} fastopen_key SEC(".maps");

/* Per client address (16-byte form), FastOpenLimit's token bucket as the time it runs (or ran) empty,
 * GCRA's form of it: a TFO SYN at `now` takes a token when max(empty, now - credit) + cost <= now, and
 * moves `empty` on by one cost. An LRU as FastOpenLimit is: a forgotten address starts again full.
 * Shared by the CPUs: the cost is added atomically, so the long-run rate holds exactly; the refill (a
 * plain write, for a bucket found full) and the check are not atomic with it, so two CPUs taking the
 * same address's last token at the same instant may both pass: a burst may exceed by one per CPU. */
#define FASTOPEN_SOURCES 16384 /* handler.FASTOPEN_SOURCES */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FASTOPEN_SOURCES);
	__type(key, __u8[16]);
	__type(value, __u64);
} fastopen_budget SEC(".maps");

/* A TFO option the walk met at `i` (kind, size already bounds-checked): what the SYN carries now
 * (packet._fastopen), its cookie's length in `cookie_length`, its bytes in `cookie` when 8 long (the
 * only length the backends' kernels make). */
static __always_inline __u8 fastopen_ask_of(const __u8 *tcp, __u32 i, __u8 kind, __u8 size, __u8 asked,
					    __u8 *cookie_length, __u64 *cookie)
{
	__u32 start = kind == TCPOPT_FASTOPEN ? 2 : 4, length;

	if (kind != TCPOPT_FASTOPEN &&
	    (size < TCPOLEN_EXPERIMENTAL_REQUEST || (tcp[(i + 2) & 63] << 8 | tcp[(i + 3) & 63]) != TCPOPT_FASTOPEN_MAGIC))
		return asked; /* another experiment: ignored */
	length = size - start;
	if (length & 1)
		return asked;
	if (!length)
		return kind == TCPOPT_FASTOPEN ? FASTOPEN_REQUEST : FASTOPEN_REQUEST_EXPERIMENTAL;
	if (length < 4 || length > 16)
		return FASTOPEN_NONE;
	*cookie_length = length;
	if (length == FASTOPEN_COOKIE_BYTES) {
#pragma unroll
		for (__u32 k = 0; k < FASTOPEN_COOKIE_BYTES; k++)
			((__u8 *)cookie)[k] = tcp[(i + start + k) & 63];
	}
	return kind == TCPOPT_FASTOPEN ? FASTOPEN_COOKIE : FASTOPEN_COOKIE_EXPERIMENTAL;
}

/* The cookie the backends' kernels make for `seg`'s client and VIP with `key`, as a little-endian CPU
 * stores it (the kernel's cpu_to_le64). Its own BPF function, hashing the segment's own addresses (the
 * IPv6 message is saddr and daddr as they lie in struct segment): inlined, or with a message copy, it
 * pushed the SYN path's stack frames past 512 bytes. */
static __noinline __u64 fastopen_cookie(const struct segment *seg, const __u8 key[16])
{
	if (seg->family == 4) { /* the 4-byte addresses, as the kernel's IPv4 cookie */
		__u64 message;

		__builtin_memcpy(&message, &seg->saddr[12], 4);
		__builtin_memcpy((__u8 *)&message + 4, &seg->daddr[12], 4);
		return siphash_words(&message, 1, 2, 4, key);
	}
	return siphash_words((const __u64 *)seg->saddr, 4, 2, 4, key);
}

/* Takes a token of `seg`'s source's budget at monotonic time `now` (fastopen_budget): 1 if there was one. */
static __always_inline int fastopen_budget_take(const struct segment *seg, const struct fastopen_key *key, __u64 now)
{
	__u64 cost = key->budget_cost_ns, credit = key->budget_credit_ns;
	__u64 *empty = bpf_map_lookup_elem(&fastopen_budget, seg->saddr);

	if (!cost || credit < cost)
		return 0;
	if (!empty) { /* a full bucket, less this SYN's token */
		__u64 fresh = now - credit + cost;

		if (!bpf_map_update_elem(&fastopen_budget, seg->saddr, &fresh, BPF_NOEXIST))
			return 1;
		if (!(empty = bpf_map_lookup_elem(&fastopen_budget, seg->saddr))) /* another CPU's, just made */
			return 0;
	}
	__u64 seen = *(volatile __u64 *)empty;
	if (seen + credit < now) { /* full: the credit past the burst is lost */
		seen = now - credit;
		*empty = seen;
	}
	if (seen + cost > now)
		return 0;
	__sync_fetch_and_add(empty, cost);
	return 1;
}

/* Declared here, defined with the forwarding below: the SYN path checks a TFO SYN's data with it. */
static __always_inline int segment_checksum_holds(void *ctx, int xdp, const struct segment *seg);

/* What answer_syn and answer_syn_xdp return, in place of a verdict, for a SYN fastopen_decision accepted:
 * handle_frame forwards it (forward_fastopen_*; called from answer_syn, the stack frames would exceed 512
 * bytes). No TC_ACT_ or XDP_ value. */
#define FASTOPEN_FORWARD 0x7fff

/* The farm's key for a SYN that asks for a cookie at wall time `now_ns`: NULL when TFO is off, and
 * `stale` set when the key is another period's (the loader is late: the queue answers). */
static __always_inline const struct fastopen_key *fastopen_key_now(__u64 now_ns, int *stale)
{
	__u32 zero = 0;
	const struct fastopen_key *key = bpf_map_lookup_elem(&fastopen_key, &zero);

	*stale = key && (!key->period_ns || now_ns / key->period_ns != key->key_period);
	return key;
}

/* The TFO option at `reply[at]`, in the form asked: `22 0a` cookie `01 01`, or `fe 0c f9 89` cookie
 * (FASTOPEN_OPTION_BYTES either way, as Linux writes them). */
static __always_inline void write_fastopen_option(__u8 *reply, __u32 at, __u8 experimental, __u64 cookie)
{
	const __u8 *bytes = (const __u8 *)&cookie;
	__u32 start = experimental ? 4 : 2;

	if (experimental) {
		reply[at & 63] = TCPOPT_EXPERIMENTAL;
		reply[(at + 1) & 63] = FASTOPEN_OPTION_BYTES;
		reply[(at + 2) & 63] = TCPOPT_FASTOPEN_MAGIC >> 8;
		reply[(at + 3) & 63] = TCPOPT_FASTOPEN_MAGIC & 0xff;
	} else {
		reply[at & 63] = TCPOPT_FASTOPEN;
		reply[(at + 1) & 63] = 2 + FASTOPEN_COOKIE_BYTES;
		reply[(at + 10) & 63] = TCPOPT_NOP;
		reply[(at + 11) & 63] = TCPOPT_NOP;
	}
#pragma unroll
	for (__u32 i = 0; i < FASTOPEN_COOKIE_BYTES; i++)
		reply[(at + start + i) & 63] = bytes[i];
}

/* The sum of the TCP pseudo-header (addresses as given, 16-byte form; protocol; TCP length) folded to 32
 * bits, bpf_csum_diff's seed: added up inline, where two helper calls cost ~30 ns a SYN. Byte order
 * needs no care: a one's-complement sum only needs each byte's parity of position kept, and the
 * protocol and length land at the pseudo-header's positions in both families' layouts. */
static __always_inline __u32 pseudo_header_sum(__u8 family, const __u8 saddr[16], const __u8 daddr[16],
					       __u32 tcp_length)
{
	const __u32 *s = (const void *)saddr, *d = (const void *)daddr;
	__u64 sum = (__u64)bpf_htonl(tcp_length) + bpf_htonl(IPPROTO_TCP);

	if (family == 4)
		sum += (__u64)s[3] + d[3];
	else
		sum += (__u64)s[0] + s[1] + s[2] + s[3] + d[0] + d[1] + d[2] + d[3];
	sum = (sum & 0xffffffff) + (sum >> 32);
	return (sum & 0xffffffff) + (sum >> 32);
}

/* A TCP header's sum (whole 32-bit words, at most 60 bytes, in a buffer of the program's) on top of
 * `sum`, as bpf_csum_diff adds it up: inline, where the two helper calls cost ~50 ns a SYN. A loop, not
 * unrolled: clang knows only a bound of its count (the length's), and fully unrolls such a loop up to 8
 * times (-unroll-max-upperbound); `#pragma unroll` here only warned, and the object was the same without. */
static __always_inline __u32 header_sum(const __u8 *header, __u32 length, __u32 sum)
{
	const header_word *words = (const void *)header;
	__u64 total = sum;

	for (__u32 i = 0; i < MAX_TCP_HEADER / 4; i++) {
		if (i * 4 >= length)
			break;
		total += words[i];
	}
	total = (total & 0xffffffff) + (total >> 32);
	return (total & 0xffffffff) + (total >> 32);
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
	__u8 fastopen; /* enum fastopen_ask */
	__u8 fastopen_cookie_length;
	__u64 fastopen_cookie; /* when 8 bytes long: as they lie in the option */
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
	case TCPOPT_FASTOPEN:
	case TCPOPT_EXPERIMENTAL:
		walk->options.fastopen = fastopen_ask_of(walk->tcp, i, kind, size, walk->options.fastopen,
							 &walk->options.fastopen_cookie_length,
							 &walk->options.fastopen_cookie);
		break;
	}
	walk->parsed = -1;
	walk->at = i + size;
	return 0;
}

/* The option layouts most SYNs carry, read without the walk (its bpf_loop calls cost ~80 ns a SYN,
 * benchmarks/front_xdp_cost.py); each layout fixes everything parse_tcp_options reads. Linux's: MSS,
 * SACK permitted, timestamps, NOP, window scale (20 bytes); without timestamps (build_tcp_options'
 * order too): MSS, NOP, NOP, SACK permitted, NOP, window scale (12). 0: walk them. */
static __noinline int read_common_options(struct option_walk *walk)
{
	const __u8 *o = &walk->tcp[sizeof(struct tcphdr)];
	struct syn_options *options = &walk->options;

	if (o[0] != TCPOPT_MSS || o[1] != TCPOLEN_MSS)
		return 0;
	if (walk->length == sizeof(struct tcphdr) + 20 && o[4] == TCPOPT_SACK_PERM && o[5] == TCPOLEN_SACK_PERM &&
	    o[6] == TCPOPT_TIMESTAMP && o[7] == TCPOLEN_TIMESTAMP && o[16] == TCPOPT_NOP && o[17] == TCPOPT_WINDOW &&
	    o[18] == TCPOLEN_WINDOW) {
		options->tsval = (__u32)o[8] << 24 | (__u32)o[9] << 16 | (__u32)o[10] << 8 | o[11];
		options->has_timestamp = 1;
		options->wscale = o[19];
	} else if (walk->length == sizeof(struct tcphdr) + 12 && o[4] == TCPOPT_NOP && o[5] == TCPOPT_NOP &&
		   o[6] == TCPOPT_SACK_PERM && o[7] == TCPOLEN_SACK_PERM && o[8] == TCPOPT_NOP &&
		   o[9] == TCPOPT_WINDOW && o[10] == TCPOLEN_WINDOW) {
		options->wscale = o[11];
	} else {
		return 0;
	}
	options->mss = o[2] << 8 | o[3];
	options->has_mss = 1;
	options->sack_permitted = 1;
	options->has_wscale = 1;
	return 1;
}

/* The cookie's data bits (docs/cookie.md): epoch mod 4, window scale code, SACK, ECN, MSS index. */
static __always_inline __u32 cookie_data(__u8 family, const struct syn_options *options, __u8 wscale_ok, __u8 sack,
					 __u8 ecn, __u64 epoch)
{
	const __u16 *table = family == 4 ? mss_table_v4 : mss_table_v6;
	__u32 mss_index = 0;

	if (options->has_mss) {
		mss_index = 3;
		while (mss_index && options->mss < table[mss_index])
			mss_index--;
	}
	__u32 wscale = !wscale_ok ? COOKIE_WSCALE_NONE
		       : options->wscale > COOKIE_WSCALE_MAX ? COOKIE_WSCALE_MAX : options->wscale;

	return (epoch % COOKIE_EPOCH_SLOTS) << COOKIE_EPOCH_SHIFT | wscale << COOKIE_WSCALE_SHIFT |
	       (sack ? COOKIE_SACK_BIT : 0) | (ecn ? COOKIE_ECN_BIT : 0) | mss_index;
}

/* The salt new cookies use now, or 0 when the loader has not (yet) written this epoch's slot. */
static __always_inline const struct salt_slot *minting_slot(const struct local_copy *copy, __u64 epoch)
{
	const struct salt_slot *slot = &copy->salts[epoch % COOKIE_EPOCH_SLOTS];

	if (!slot->valid || slot->epoch != epoch || !slot->nkeys)
		return 0;
	return slot;
}

/* cookie_slot (bpf/synproxy.h) over this CPU's copy of the salts. */
static __always_inline const struct salt_slot *copied_cookie_slot(const struct local_copy *copy, __u32 cookie)
{
	const struct salt_slot *slot = &copy->salts[(cookie >> COOKIE_EPOCH_SHIFT) & (COOKIE_EPOCH_SLOTS - 1)];

	return slot->valid ? slot : 0;
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

/* Packet bytes into a buffer, whichever hook runs: `xdp` is a constant at every call, so each program
 * keeps only its own helper. */
static __always_inline long load_bytes(void *ctx, int xdp, __u32 offset, void *to, __u32 length)
{
	return xdp ? bpf_xdp_load_bytes(ctx, offset, to, length) : bpf_skb_load_bytes(ctx, offset, to, length);
}

/* The packet's first and last byte + 1 for direct access, whichever hook runs (as load_bytes). */
static __always_inline void *packet_data(void *ctx, int xdp)
{
	return xdp ? (void *)(long)((struct xdp_md *)ctx)->data : (void *)(long)((struct __sk_buff *)ctx)->data;
}

static __always_inline void *packet_end(void *ctx, int xdp)
{
	return xdp ? (void *)(long)((struct xdp_md *)ctx)->data_end : (void *)(long)((struct __sk_buff *)ctx)->data_end;
}

/* `length` bytes of TCP header (whole 32-bit words, at most 60) from `offset` into `to`: read in place
 * where the frame's data holds them, else (a tc packet whose linear data ends early) by load_bytes. 0
 * when the packet is shorter. In place: ~30 ns less per SYN than the helper call (XDP and tc alike). */
static __always_inline int copy_tcp_header(void *ctx, int xdp, __u32 offset, __u8 *to, __u32 length)
{
	void *data_end = packet_end(ctx, xdp);
	const header_word *from = packet_data(ctx, xdp) + (offset & 0xff);
	header_word *words = (void *)to;

#pragma unroll
	for (__u32 i = 0; i < MAX_TCP_HEADER / 4; i++) {
		if (i * 4 >= length)
			return 1;
		if ((void *)(from + i + 1) > data_end)
			break;
		words[i] = from[i];
	}
	return !load_bytes(ctx, xdp, offset, to, length);
}

/* The lookup of the route back to `client`, as the kernel would forward the SYN-ACK it got from the queue:
 * `fib` filled for it (the SYN-ACK's addresses, ports and `length`), then bpf_fib_lookup's result. */
static __always_inline int fib_lookup_back(void *ctx, __u32 ifindex, const struct segment *seg, const __u8 client[16],
					   __u32 length, struct bpf_fib_lookup *fib)
{
	fib->l4_protocol = IPPROTO_TCP;
	fib->sport = seg->dport;
	fib->dport = seg->sport;
	fib->tot_len = length;
	fib->ifindex = ifindex;
	if (seg->family == 4) {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, &seg->daddr[12], 4);
		__builtin_memcpy(&fib->ipv4_dst, &client[12], 4);
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, seg->daddr, 16);
		__builtin_memcpy(fib->ipv6_dst, client, 16);
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* Is `address` routed as the default route says, by the control plane's proof (`route_proof`)? Not
 * when the proof is off or the address lies in one of the routes it excepts. */
static __always_inline int routed_by_default(const struct route_back_family *proof, const __u8 address[16])
{
	__u64 words[2];

	if (!proof->enabled)
		return 0;
	__builtin_memcpy(words, address, 16);
#pragma unroll
	for (__u32 i = 0; i < ROUTE_BACK_EXCEPTIONS; i++) {
		const struct route_back_prefix *prefix = &proof->exceptions[i];

		if (i >= proof->exceptions_count)
			break;
		if ((words[0] & prefix->mask[0]) == prefix->network[0] && (words[1] & prefix->mask[1]) == prefix->network[1])
			return 0;
	}
	return 1;
}

/* The longest SYN-ACK (IP header, the longest TCP header): the probe's lookup checks the route's MTU for
 * it, so its answer holds for every shorter one. */
#define SYN_ACK_LONGEST(family) \
	(((family) == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) + MAX_TCP_HEADER)

/* The route back to the client: the egress interface and MAC addresses left in `fib`, and bpf_fib_lookup's
 * result (or its cached SUCCESS). A client the control plane's proof covers (routed_by_default) gets this
 * CPU's cached lookup of the proof's probe, younger than ROUTE_CACHE_JIFFIES and of the copy's generation,
 * else a new one; every other client (and a probe lookup that did not succeed: no neighbour yet, an MTU
 * too small, ...) its own lookup, as the kernel would forward the queue's SYN-ACK. */
static __always_inline int route_back(void *ctx, struct local_copy *copy, __u32 ifindex, const struct segment *seg,
				      __u32 length, struct bpf_fib_lookup *fib)
{
	__u32 v6 = seg->family != 4;
	const struct route_back_family *proof = &copy->route_back.family[v6 & 1];

	if (routed_by_default(proof, seg->saddr)) {
		struct next_hop_back *cached = &copy->next_hops_back[v6 & 1][ifindex & (NEXT_HOP_BACK_SLOTS - 1)];
		__u64 now = bpf_jiffies64();

		if (cached->generation != copy->generation || cached->ingress_ifindex != ifindex ||
		    now - cached->checked_jiffies >= ROUTE_CACHE_JIFFIES) {
			if (fib_lookup_back(ctx, ifindex, seg, proof->probe, SYN_ACK_LONGEST(seg->family), fib) !=
			    BPF_FIB_LKUP_RET_SUCCESS) {
				cached->generation = 0;
				__builtin_memset(fib, 0, sizeof(*fib));
				return fib_lookup_back(ctx, ifindex, seg, seg->saddr, length, fib);
			}
			cached->checked_jiffies = now;
			cached->generation = copy->generation;
			cached->ingress_ifindex = ifindex;
			cached->ifindex = fib->ifindex;
			__builtin_memcpy(cached->dmac, fib->dmac, ETH_ALEN);
			__builtin_memcpy(cached->smac, fib->smac, ETH_ALEN);
			return BPF_FIB_LKUP_RET_SUCCESS;
		}
		fib->ifindex = cached->ifindex;
		__builtin_memcpy(fib->dmac, cached->dmac, ETH_ALEN);
		__builtin_memcpy(fib->smac, cached->smac, ETH_ALEN);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	return fib_lookup_back(ctx, ifindex, seg, seg->saddr, length, fib);
}

/* The next hop back to the client when the operator says it is the neighbour the SYN came from
 * (front.syn_reply: ingress, docs/front.md): the frame's Ethernet addresses swapped, out of the interface
 * it came in by, without the route lookup (~210 ns of a SYN's ~660, benchmarks/front_xdp_stages.py). */
static __always_inline int reply_to_sender(void *ctx, int xdp, __u32 ifindex, struct bpf_fib_lookup *fib)
{
	const struct ethhdr *eth = packet_data(ctx, xdp);

	if ((void *)(eth + 1) > packet_end(ctx, xdp))
		return BPF_FIB_LKUP_RET_NOT_FWDED;
	__builtin_memcpy(fib->dmac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(fib->smac, eth->h_dest, ETH_ALEN);
	fib->ifindex = ifindex;
	return BPF_FIB_LKUP_RET_SUCCESS;
}

/* Where the SYN-ACK goes, as front.syn_reply says: route_back's answer, or reply_to_sender's. */
static __always_inline int next_hop_back(void *ctx, int xdp, const struct front_config *cfg,
					 struct local_copy *copy, __u32 ifindex, const struct segment *seg, __u32 length,
					 struct bpf_fib_lookup *fib)
{
	if (cfg->syn_reply_ingress)
		return reply_to_sender(ctx, xdp, ifindex, fib);
	return route_back(ctx, copy, ifindex, seg, length, fib);
}

/* A SYN-ACK's IP and TCP headers, ready to replace the SYN's. */
struct syn_ack {
	__u8 ip[sizeof(struct ipv6hdr)]; /* IPv4: the first 20 bytes */
	__u8 tcp[64];
	__u32 tcp_length;                /* 24..52 */
	__u8 fastopen;                   /* it carries a TFO cookie */
	__u8 fastopen_fallback;          /* enum front_counter: why the SYN's TFO cookie was not accepted; 0: none */
};

static __always_inline __u32 ip_header_length(__u8 family)
{
	return family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
}

/* What a SYN carrying a TFO cookie and `payload` bytes of data gets with `key` (NULL: TFO is off), as
 * handler._fastopen_decision decides: FRONT_FASTOPEN_ACCEPTED (forward it), a fallback's counter (answer
 * it), or FRONT_QUEUED (no forwarding configuration yet). */
static __always_inline __u32 fastopen_decision(const struct segment *seg, const struct syn_options *options,
					       const struct fastopen_key *key, __u32 payload,
					       const struct local_copy *copy)
{
	const struct front_forwarding *fwd;

	if (!key)
		return FRONT_FASTOPEN_DISABLED;
	if (options->fastopen_cookie_length != FASTOPEN_COOKIE_BYTES ||
	    (options->fastopen_cookie != fastopen_cookie(seg, key->primary) &&
	     options->fastopen_cookie != fastopen_cookie(seg, key->backup)))
		return FRONT_FASTOPEN_INVALID_COOKIE;
	if (!payload)
		return FRONT_FASTOPEN_NO_DATA;
	if (!(fwd = copied_forwarding(copy)))
		return FRONT_QUEUED;
	if (seg->ip_length + ENCAP_OVERHEAD > fwd->farm_mtu)
		return FRONT_FASTOPEN_TOO_BIG;
	if (!fastopen_budget_take(seg, key, bpf_ktime_get_ns()))
		return FRONT_FASTOPEN_RATE_LIMITED;
	return FRONT_FASTOPEN_ACCEPTED;
}

/* Everything answering a SYN takes but the rewrite: the checks, the option walk, the cookie and the
 * SYN-ACK's headers, as handler._answer_syn builds them. Returns FRONT_SYN_ANSWERED when `answer` is
 * ready, else the outcome of a SYN left to the queue. */
static __always_inline __u32 prepare_syn_ack(void *ctx, int xdp, const struct segment *seg,
					     const struct front_config *cfg, const struct local_copy *copy,
					     __u32 frame_length, struct syn_ack *answer)
{
	__u32 ip_header = seg->tcp_offset - sizeof(struct ethhdr);
	__u32 tcp_length = seg->tcp_length & 0x3c; /* doff * 4: at most 60 */
	struct option_walk walk = {.at = sizeof(struct tcphdr), .parsed = -1};

	/* IPv4 options, a length the kernel would refuse: the queue decides. */
	if (seg->ip_length < ip_header + tcp_length || sizeof(struct ethhdr) + seg->ip_length > frame_length ||
	    (seg->family == 4 && ip_header != sizeof(struct iphdr)))
		return FRONT_QUEUED;
	if (tcp_length < sizeof(struct tcphdr))
		return FRONT_QUEUED;
	if (!copy_tcp_header(ctx, xdp, seg->tcp_offset, walk.tcp, tcp_length))
		return FRONT_QUEUED;
	walk.length = tcp_length;

	/* Checksums: the IPv4 header's (the kernel checks it after this hook) and the segment's. A local
	 * sender's (a veth's) SYN still carries a partial one: the queue's copy gets it completed. */
	if (seg->family == 4) {
		const struct iphdr *ip = packet_data(ctx, xdp) + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > packet_end(ctx, xdp) || ipv4_header_fold(ip))
			return FRONT_UNVERIFIED;
	}
	__u32 sum = pseudo_header_sum(seg->family, seg->saddr, seg->daddr, tcp_length);
	__u32 payload = seg->ip_length - ip_header - tcp_length; /* a TFO SYN's data, or data ignored */
	if (payload ? !segment_checksum_holds(ctx, xdp, seg) : fold(header_sum(walk.tcp, tcp_length, sum)))
		return FRONT_UNVERIFIED;

	if (!read_common_options(&walk)) {
		bpf_loop(MAX_OPTIONS_WALKED + 1, walk_option, &walk, 0);
		if (walk.parsed != 1)
			return FRONT_QUEUED;
	}
	const struct syn_options *options = &walk.options; /* not copied: the stack has no bytes to spare */

	__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
	const struct fastopen_key *fastopen = 0;
	if (options->fastopen) {
		int stale;

		fastopen = fastopen_key_now(now_ns, &stale);
		if (stale)
			return FRONT_QUEUED;
		if (options->fastopen >= FASTOPEN_COOKIE) {
			__u32 decided = fastopen_decision(seg, options, fastopen, payload, copy);

			if (decided == FRONT_FASTOPEN_ACCEPTED || decided == FRONT_QUEUED)
				return decided;
			answer->fastopen_fallback = decided;
		}
	}
	__u64 epoch = now_ns / cfg->period_ns;
	const struct salt_slot *slot = minting_slot(copy, epoch);
	if (!slot)
		return FRONT_NO_SALT;

	__u8 sack = cfg->sack && options->sack_permitted;
	__u8 ecn = cfg->ecn && (seg->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR);
	/* An option a backend's kernel would refuse (config `timestamps`, `window_scaling`): as if not offered. */
	__u8 wscale_ok = cfg->window_scaling && options->has_wscale;
	__u32 data = cookie_data(seg->family, options, wscale_ok, sack, ecn, epoch);
	union cookie_message message;
	cookie_message_of(&message, seg, seg->seq, epoch, data);
	__u32 cookie = (__u32)(siphash24_48(message.words, slot->keys[0]) & COOKIE_MAC_MASK) << COOKIE_DATA_BITS |
		       data;

	/* The SYN-ACK's TCP header and options, as build_tcp_options orders them. */
	__u8 *reply = answer->tcp;
	struct tcphdr *th = (void *)reply;
	__u32 at = sizeof(struct tcphdr);
	__u16 mss = cfg->mss[seg->family == 4 ? 0 : 1];

	reply[at] = TCPOPT_MSS;
	reply[at + 1] = TCPOLEN_MSS;
	reply[at + 2] = mss >> 8;
	reply[at + 3] = mss & 0xff;
	at += TCPOLEN_MSS;
	if (cfg->timestamps && options->has_timestamp) {
		__u32 tsval = bpf_htonl((__u32)(now_ns / 1000000));
		__u32 tsecr = bpf_htonl(options->tsval);

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
	if (wscale_ok) {
		reply[at & 63] = TCPOPT_NOP;
		reply[(at + 1) & 63] = TCPOPT_WINDOW;
		reply[(at + 2) & 63] = TCPOLEN_WINDOW;
		reply[(at + 3) & 63] = cfg->server_wscale;
		at += 4;
	}
	if (fastopen) { /* last, as build_tcp_options puts it */
		write_fastopen_option(reply, at, options->fastopen == FASTOPEN_REQUEST_EXPERIMENTAL ||
						 options->fastopen == FASTOPEN_COOKIE_EXPERIMENTAL,
				      fastopen_cookie(seg, fastopen->primary));
		at += FASTOPEN_OPTION_BYTES;
		answer->fastopen = 1;
	}
	__u32 reply_length = at & 0x3c; /* 24..52, a multiple of 4 */
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
	th->check = fold(header_sum(reply, reply_length, sum));
	answer->tcp_length = reply_length;

	if (seg->family == 4) {
		struct iphdr *ip = (void *)answer->ip;

		ip->version = 4;
		ip->ihl = 5;
		ip->tot_len = bpf_htons(sizeof(struct iphdr) + reply_length);
		ip->frag_off = bpf_htons(IP_DF);
		ip->ttl = SYN_ACK_TTL;
		ip->protocol = IPPROTO_TCP;
		__builtin_memcpy(&ip->saddr, &seg->daddr[12], 4);
		__builtin_memcpy(&ip->daddr, &seg->saddr[12], 4);
		ip->check = ipv4_header_fold(ip);
	} else {
		struct ipv6hdr *ip6 = (void *)answer->ip;

		ip6->version = 6;
		ip6->payload_len = bpf_htons(reply_length);
		ip6->nexthdr = IPPROTO_TCP;
		ip6->hop_limit = SYN_ACK_TTL;
		__builtin_memcpy(&ip6->saddr, seg->daddr, 16);
		__builtin_memcpy(&ip6->daddr, seg->saddr, 16);
	}
	return FRONT_SYN_ANSWERED;
}

/* A SYN-ACK sent with a TFO cookie is counted once more, as such, and one to a SYN whose cookie was not
 * accepted once more by why. */
static __always_inline void count_fastopen(__u32 path, const struct segment *seg, const struct syn_ack *answer)
{
	if (answer->fastopen)
		count_on(path, seg, FRONT_FASTOPEN_COOKIE_ISSUED, 0);
	if (answer->fastopen_fallback)
		count_on(path, seg, answer->fastopen_fallback, 0);
}

static __noinline int answer_syn(struct __sk_buff *skb, const struct segment *seg,
				      const struct front_config *cfg, struct local_copy *copy)
{
	struct syn_ack answer = {};
	__u32 outcome = prepare_syn_ack(skb, 0, seg, cfg, copy, skb->len, &answer);
	if (outcome == FRONT_FASTOPEN_ACCEPTED)
		return FASTOPEN_FORWARD;
	if (outcome != FRONT_SYN_ANSWERED)
		return count(seg, outcome, TC_ACT_OK);

	__u32 ip_length = ip_header_length(seg->family);
	__u32 reply_length = answer.tcp_length & 0x3c;
	struct bpf_fib_lookup fib = {};
	int route = next_hop_back(skb, 0, cfg, copy, skb->ifindex, seg, ip_length + reply_length, &fib);
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(seg, FRONT_UNROUTED, TC_ACT_OK); /* the kernel's own routing decides */

	/* Rewrite the packet: IP header, TCP header, nothing after. */
	if ((skb->len != sizeof(struct ethhdr) + ip_length + reply_length &&
	     bpf_skb_change_tail(skb, sizeof(struct ethhdr) + ip_length + reply_length, 0)) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), answer.ip, ip_length, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + ip_length, answer.tcp, reply_length,
				BPF_F_RECOMPUTE_CSUM))
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
		count_fastopen(FRONT_PATH_TC, seg, &answer);
		return count(seg, FRONT_SYN_ANSWERED, bpf_redirect_neigh(fib.ifindex, &next_hop, sizeof(next_hop), 0));
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return count(seg, FRONT_UNSENT, TC_ACT_SHOT);
	count_fastopen(FRONT_PATH_TC, seg, &answer);
	return count(seg, FRONT_SYN_ANSWERED, bpf_redirect(fib.ifindex, 0));
}

/* --- XDP: the SYN-ACK --- */

/* Out of the interface the packet came in: XDP_TX; out of another: a redirect. */
static __always_inline int send(struct xdp_md *ctx, __u32 ifindex)
{
	return ifindex == ctx->ingress_ifindex ? XDP_TX : bpf_redirect(ifindex, 0);
}

/* The SYN-ACK's headers written over the frame adjust_tail sized for them: directly, where four
 * bpf_xdp_store_bytes calls cost ~70 ns more (benchmarks/front_xdp_cost.py). 0 if the frame is shorter
 * (it cannot be). */
static __always_inline int write_syn_ack(struct xdp_md *ctx, const struct bpf_fib_lookup *fib,
					 const struct syn_ack *answer, __u8 family)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)(long)ctx->data;
	void *ip = eth + 1;
	const header_word *from = (const void *)answer->tcp;
	header_word *to;

	if (ip + sizeof(struct ipv6hdr) > data_end) /* the shortest SYN-ACK, IPv4's, is longer than 40 */
		return 0;
	if (family == 4) {
		__builtin_memcpy(ip, answer->ip, sizeof(struct iphdr));
		to = ip + sizeof(struct iphdr);
	} else {
		__builtin_memcpy(ip, answer->ip, sizeof(struct ipv6hdr));
		to = ip + sizeof(struct ipv6hdr);
	}
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
#pragma unroll
	for (__u32 i = 0; i < MAX_TCP_HEADER / 4; i++) {
		if (i * 4 >= answer->tcp_length)
			break;
		if ((void *)(to + i + 1) > data_end)
			return 0;
		to[i] = from[i];
	}
	return 1;
}

/* Its own BPF function (as forward() is): inlined together, their stack frames would not fit in 512 bytes. */
static __noinline int answer_syn_xdp(struct xdp_md *ctx, const struct segment *seg, const struct front_config *cfg,
					  struct local_copy *copy)
{
	__u32 frame_length = ctx->data_end - ctx->data;
	struct syn_ack answer = {};
	__u32 outcome = prepare_syn_ack(ctx, 1, seg, cfg, copy, frame_length, &answer);
	if (outcome == FRONT_FASTOPEN_ACCEPTED)
		return FASTOPEN_FORWARD;
	if (outcome != FRONT_SYN_ANSWERED)
		return count_xdp(seg, outcome, XDP_PASS);

	__u32 ip_length = ip_header_length(seg->family);
	__u32 reply_length = answer.tcp_length & 0x3c;
	struct bpf_fib_lookup fib = {};
	/* An unresolved neighbour too: XDP has no bpf_redirect_neigh, the kernel resolves it for the queue. */
	if (next_hop_back(ctx, 1, cfg, copy, ctx->ingress_ifindex, seg, ip_length + reply_length, &fib) !=
	    BPF_FIB_LKUP_RET_SUCCESS)
		return count_xdp(seg, FRONT_UNROUTED, XDP_PASS);
	/* Linux's SYN (MSS, SACK, timestamps, window scale) is as long as its SYN-ACK: no helper call. */
	int growth = (int)(sizeof(struct ethhdr) + ip_length + reply_length) - (int)frame_length;
	if (growth && bpf_xdp_adjust_tail(ctx, growth))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS); /* unchanged */
	if (!write_syn_ack(ctx, &fib, &answer, seg->family))
		return count_xdp(seg, FRONT_UNSENT, XDP_DROP); /* half rewritten */
	count_fastopen(FRONT_PATH_XDP, seg, &answer);
	return count_xdp(seg, FRONT_SYN_ANSWERED, send(ctx, fib.ifindex));
}

#define MAX_CHECKSUM_BLOCKS 8 /* of 256 bytes: segments up to 2303 bytes are checked here */

/* --- Every other segment: the decisions both hooks share, then each one's packet surgery --- */

/* Sum `length` packet bytes from `offset` into `sum`: bpf_csum_diff reads packet memory in pieces of a
 * constant size (a multiple of 4, at most 512), the last 1-3 bytes padded with zeros. -1 when the
 * segment is longer than this reads (or, at tc, than the linear data holds). */
static __always_inline __s64 packet_sum(void *ctx, int xdp, __u32 offset, __u32 length, __s64 sum)
{
	void *data_end = packet_end(ctx, xdp);
	__u8 *at = packet_data(ctx, xdp) + (offset & 0xff);

#pragma unroll
	for (int i = 0; i < MAX_CHECKSUM_BLOCKS; i++) {
		if (length < 256)
			break;
		if ((void *)(at + 256) > data_end)
			return -1;
		sum = bpf_csum_diff(0, 0, (void *)at, 256, sum);
		at += 256;
		length -= 256;
	}
	if (length >= 256)
		return -1;
#define SUM_PIECE(size)                                                  \
	if (length & (size)) {                                           \
		if ((void *)(at + (size)) > data_end)                    \
			return -1;                                       \
		sum = bpf_csum_diff(0, 0, (void *)at, (size), sum);      \
		at += (size);                                            \
	}
	SUM_PIECE(128)
	SUM_PIECE(64)
	SUM_PIECE(32)
	SUM_PIECE(16)
	SUM_PIECE(8)
	SUM_PIECE(4)
#undef SUM_PIECE
	if (length & 3) {
		__u8 last[4] = {};

		if ((void *)(at + 1) > data_end)
			return -1;
		last[0] = at[0];
		if ((length & 3) > 1) {
			if ((void *)(at + 2) > data_end)
				return -1;
			last[1] = at[1];
		}
		if ((length & 3) > 2) {
			if ((void *)(at + 3) > data_end)
				return -1;
			last[2] = at[2];
		}
		sum = bpf_csum_diff(0, 0, (void *)last, 4, sum);
	}
	return sum;
}

/* segment_checksum_holds' work, whichever hook runs. */
static __always_inline int tcp_checksum_holds(void *ctx, int xdp, const struct segment *seg)
{
	__u32 length = seg->ip_length - (seg->tcp_offset - sizeof(struct ethhdr));

	if (!xdp && bpf_skb_pull_data(ctx, sizeof(struct ethhdr) + seg->ip_length))
		return 0;
	__s64 sum = packet_sum(ctx, xdp, seg->tcp_offset, length,
			       pseudo_header_sum(seg->family, seg->saddr, seg->daddr, length));

	return sum >= 0 && !fold(sum);
}

/* Global functions: the verifier checks each once, knowing only its arguments' types (so `seg` may be
 * NULL to it: the kernel's arg:nonnull tag needs Linux 6.8). Inlined into the SYN path (a TFO SYN's
 * data), packet_sum's branches and packet ranges multiplied the states the rest of the path was checked
 * in, past the verifier's 1M instructions once the TCP checksums were summed inline (docs/front.md,
 * "The verifier's budget"). */
__noinline int segment_checksum_holds_xdp(struct xdp_md *ctx, const struct segment *seg)
{
	return seg && tcp_checksum_holds(ctx, 1, seg);
}

__noinline int segment_checksum_holds_tc(struct __sk_buff *skb, const struct segment *seg)
{
	return seg && tcp_checksum_holds(skb, 0, seg);
}

/* Does the segment's TCP checksum hold, as handler's tcp_checksum_valid reads it? At tc the segment is
 * first made linear (one handshake ACK per connection pays for it). */
static __always_inline int segment_checksum_holds(void *ctx, int xdp, const struct segment *seg)
{
	return xdp ? segment_checksum_holds_xdp(ctx, seg) : segment_checksum_holds_tc(ctx, seg);
}

/* The next hop to `backend`: this CPU's cached lookup while younger than ROUTE_CACHE_JIFFIES, else a new
 * bpf_fib_lookup. It is looked up for a packet of farm_mtu bytes, so a route whose MTU is smaller leaves
 * every packet to the queue. 0 when there is no route or the neighbour is unresolved (XDP has no
 * bpf_redirect_neigh: the kernel resolves it for the queue's packet; tc does as XDP does). */
static __always_inline const struct route_entry *route_to_backend(void *ctx, int xdp, const struct local_copy *copy,
								   __be32 backend, __be16 source_port, struct route *next_hop)
{
	const struct front_forwarding *fwd = &copy->forwarding;
	__u32 ingress = xdp ? ((struct xdp_md *)ctx)->ingress_ifindex : ((struct __sk_buff *)ctx)->ifindex;
	__u32 slot = ((bpf_ntohl(backend) ^ ingress) * 2654435761u) >> 24; /* Knuth's multiplicative hash */
	struct route_entry *entry = bpf_map_lookup_elem(&routes, &slot);
	__u64 now = bpf_jiffies64();

	if (!entry)
		return 0;
	struct route *cached = &entry->route;
	if (cached->backend == backend && cached->ingress_ifindex == ingress &&
	    now - cached->checked_jiffies < ROUTE_CACHE_JIFFIES && entry->generation == copy->generation &&
	    copy->generation) {
		*next_hop = *cached;
		return entry;
	}
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_UDP,
		.sport = source_port,
		.dport = fwd->encap_port,
		.tot_len = fwd->farm_mtu,
		.ifindex = ingress,
		.ipv4_src = fwd->farm_address,
		.ipv4_dst = backend,
	};
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		cached->checked_jiffies = 0;
		return 0;
	}
	*cached = (struct route){.checked_jiffies = now, .backend = backend, .ingress_ifindex = ingress,
				 .ifindex = fib.ifindex};
	__builtin_memcpy(cached->dmac, fib.dmac, ETH_ALEN);
	__builtin_memcpy(cached->smac, fib.smac, ETH_ALEN);
	__u64 words[2] = {}; /* the outer addresses, then an IPv4 client address's zero half */
	__builtin_memcpy(&words[0], &fwd->farm_address, 4);
	__builtin_memcpy((__u8 *)&words[0] + 4, &backend, 4);
	siphash_start(&entry->encap_mac[0], words, 1, 2, fwd->encap_key);
	siphash_start(&entry->encap_mac[1], words, 2, 2, fwd->encap_key);
	entry->generation = copy->generation;
	*next_hop = *cached;
	return entry;
}

/* What forwarding a segment takes, decided: where to, and the encapsulation's fields. Callers zero it:
 * with the former owners in it, clang stored a never-set register into a field on a path that leaves
 * the plan unused (the queued one), which the verifier refuses (R2 !read_ok). */
struct forwarding_plan {
	struct route next_hop;
	__be32 farm_address;
	__be32 backend;
	struct former_owners former; /* the slot's, named in the header (Beamer's chain) */
	__be16 encap_port;
	__be16 source_port;
	__u8 flags;
	__u8 pad[3];
	__u64 mac; /* big endian */
};

/* What a flow's packets share, per CPU: its flow hash, and its encapsulation MAC for the last backend, former
 * owners and flags it was computed for. The two SipHashes are ~85 ns of a forwarded packet's ~270
 * (docs/front.md, "Its own cost") and give the same result for every packet of a flow: a packet whose
 * 4-tuple, copy generation (the flow and encap keys, the farm's address), backend, former owners and
 * flags are the entry's takes them from it, the bytes unchanged. Direct-mapped by a multiplicative hash
 * of the tuple: tuples that share a slot (a flood's, or aimed there) only replace each other, each
 * computing its own. */
#define FLOW_CACHE_BITS 9
struct flow_entry {
	__u64 generation; /* the local copy's when written; 0: empty */
	__u32 tuple[9];   /* struct segment's saddr, daddr, sport and dport */
	__be32 backend;   /* the MAC's; 0: no MAC kept */
	__u64 flow;       /* flow_hash */
	struct former_owners former;
	__u8 flags;
	__u8 pad[7];
	__u64 mac;        /* encap_mac, host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1 << FLOW_CACHE_BITS);
	__type(key, __u32);
	__type(value, struct flow_entry);
} flows SEC(".maps");

/* This CPU's entry for `seg`'s flow, holding its flow hash under the copy's generation (computed now if
 * the entry held another flow, or another generation's); NULL cannot happen (the slot is in range). */
static __always_inline struct flow_entry *flow_of(const struct segment *seg, const struct local_copy *copy)
{
	const header_word *tuple = (const void *)seg;
	__u32 mix = 0, differs = 0;

#pragma unroll
	for (__u32 i = 0; i < 9; i++)
		mix ^= tuple[i];
	__u32 slot = (mix * 2654435761u) >> (32 - FLOW_CACHE_BITS);
	struct flow_entry *entry = bpf_map_lookup_elem(&flows, &slot);
	if (!entry)
		return 0;
#pragma unroll
	for (__u32 i = 0; i < 9; i++)
		differs |= entry->tuple[i] ^ tuple[i];
	if (differs || entry->generation != copy->generation) {
		entry->flow = flow_hash(seg, copy->forwarding.flow_key);
#pragma unroll
		for (__u32 i = 0; i < 9; i++)
			entry->tuple[i] = tuple[i];
		entry->generation = copy->generation;
		entry->backend = 0;
	}
	return entry;
}

/* The outcomes of a segment the program encapsulates; every other one is left to the queue. */
static __always_inline int forwarded(__u32 outcome)
{
	return outcome == FRONT_VALIDATED || outcome == FRONT_FORWARDED || outcome == FRONT_FORWARDED_BAD_MAC ||
	       outcome == FRONT_FORWARDED_EXPIRED_EPOCH;
}

/* Where `seg`'s flow goes (its Maglev backend and the route there) and the encapsulation's fields, with
 * `flags` and the slot's former owners (an ICMP error's too: its flow's slot), for a packet decided as
 * `outcome`: that outcome, or the one that leaves it to the queue. */
static __always_inline __u32 plan_encapsulation(void *ctx, int xdp, const struct local_copy *copy,
						const struct segment *seg, __u8 flags, __u32 outcome,
						struct forwarding_plan *plan)
{
	const struct front_forwarding *fwd = &copy->forwarding;
	struct flow_entry *kept = flow_of(seg, copy);
	if (!kept)
		return FRONT_QUEUED;
	__u64 flow = kept->flow;
	__u32 index = flow % MAGLEV_TABLE_SIZE;
	const struct maglev_owners *entry = bpf_map_lookup_elem(&maglev, &index);
	if (!entry)
		return FRONT_QUEUED;
	/* Read once: the loader may rewrite them (the former owners first). */
	__be32 backend = entry->current;
	struct former_owners former = entry->former;
	if (!backend)
		return FRONT_QUEUED;
	plan->backend = backend;
	plan->former = former;
	plan->source_port = bpf_htons(ENCAP_SOURCE_PORT_BASE | (flow & ENCAP_SOURCE_PORT_MASK));
	const struct route_entry *route = route_to_backend(ctx, xdp, copy, plan->backend, plan->source_port,
							   &plan->next_hop);
	if (!route)
		return FRONT_UNROUTED;

	if (kept->backend != backend || kept->former.previous != former.previous ||
	    kept->former.earlier != former.earlier || kept->flags != flags) {
		union encap_message message;

		encap_message_of(&message, fwd->farm_address, plan->backend, seg, flags, &plan->former);
		/* encap_mac's value, from the state the route cache keeps after the message's first word(s) */
		kept->mac = seg->family == 4 ? siphash_finish(&route->encap_mac[1], &message.words[2], 5, 7, 2, 4)
					     : siphash_finish(&route->encap_mac[0], &message.words[1], 6, 7, 2, 4);
		kept->backend = backend;
		kept->former = former;
		kept->flags = flags;
	}
	plan->mac = bpf_cpu_to_be64(kept->mac);
	plan->farm_address = fwd->farm_address;
	plan->encap_port = fwd->encap_port;
	plan->flags = flags;
	return outcome;
}

/* Every segment but a SYN to a protected VIP and port, as handler.handle decides it, on either hook:
 * the outcome, and for a forwarded() one the plan the hook's surgery carries out. */
static __always_inline __u32 plan_forwarding(void *ctx, int xdp, const struct segment *seg,
					     const struct front_config *cfg, const struct local_copy *copy,
					     struct forwarding_plan *plan)
{
	const struct front_forwarding *fwd = copied_forwarding(copy);
	__u32 frame_length = xdp ? packet_end(ctx, xdp) - packet_data(ctx, xdp) : ((struct __sk_buff *)ctx)->len;
	__u32 ip_header = seg->tcp_offset - sizeof(struct ethhdr);
	__u32 ip_length = seg->ip_length;

	if (!fwd)
		return FRONT_QUEUED;
	/* What parse_tcp calls malformed, a frame shorter than its IP packet (the kernel drops both), and
	 * IPv4 options (the handler forwards those; this program leaves them to it). */
	if ((seg->family == 4 && ip_header != sizeof(struct iphdr)) || seg->tcp_length < sizeof(struct tcphdr) ||
	    ip_header + seg->tcp_length > ip_length || sizeof(struct ethhdr) + ip_length > frame_length)
		return FRONT_QUEUED;
	if (ip_length + ENCAP_OVERHEAD > fwd->farm_mtu)
		return FRONT_TOO_BIG;
	if (seg->family == 4) { /* the kernel checks it after this hook and drops what fails */
		const struct iphdr *ip = packet_data(ctx, xdp) + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > packet_end(ctx, xdp) || ipv4_header_fold(ip))
			return FRONT_UNVERIFIED;
	}

	__u32 outcome = FRONT_FORWARDED;
	__u8 flags = 0;
	if ((seg->flags & TCP_FLAG_ACK) && !(seg->flags & (TCP_FLAG_RST | TCP_FLAG_FIN))) {
		__u32 cookie = seg->ack - 1;
		/* the one clock reading, for the cookie only: a helper call costs ~20 ns */
		__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
		__u64 epoch = now_ns / cfg->period_ns;
		const struct salt_slot *slot = copied_cookie_slot(copy, cookie);
		/* A cookie of the current epoch names the minting slot itself. */
		int current = ((cookie >> COOKIE_EPOCH_SHIFT) & (COOKIE_EPOCH_SLOTS - 1)) == epoch % COOKIE_EPOCH_SLOTS;

		/* Without the current epoch's salt the map is stale (the front process stalled): it cannot
		 * tell an expired cookie from a salt not written, the handler can. */
		if (current ? !slot || slot->epoch != epoch || !slot->nkeys : !minting_slot(copy, epoch))
			return FRONT_NO_SALT;
		if (!slot || !epoch_accepted(slot->epoch, now_ns, cfg->period_ns, fwd->skew_ns)) {
			outcome = FRONT_FORWARDED_EXPIRED_EPOCH;
		} else if (!cookie_mac_valid(slot, seg, cookie)) {
			outcome = FRONT_FORWARDED_BAD_MAC;
		} else {
			/* The handler drops a validating ACK with a wrong checksum; the queue completes a
			 * local sender's partial one. */
			if (!segment_checksum_holds(ctx, xdp, seg))
				return FRONT_UNVERIFIED;
			outcome = FRONT_VALIDATED;
			flags = ENCAP_FLAG_VALIDATED;
		}
	}

	return plan_encapsulation(ctx, xdp, copy, seg, flags, outcome, plan);
}

/* The Ethernet, outer IPv4, UDP and encapsulation headers as encap.encapsulate builds them, for an
 * inner IP packet of `ip_length` bytes, written at `to`: the frame itself (XDP) or a stack copy (tc). */
static __always_inline void build_encapsulation(void *to, const struct forwarding_plan *plan, __u32 ip_length)
{
	struct ethhdr *eth = to;
	struct iphdr *outer = (void *)(eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct encap_header *header = (void *)(udp + 1);

	__builtin_memcpy(eth->h_dest, plan->next_hop.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, plan->next_hop.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	*outer = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(ENCAP_OVERHEAD + ip_length),
		.frag_off = bpf_htons(IP_DF),
		.ttl = ENCAP_TTL,
		.protocol = IPPROTO_UDP,
		.saddr = plan->farm_address,
		.daddr = plan->backend,
	};
	outer->check = ipv4_header_fold(outer);
	udp->source = plan->source_port;
	udp->dest = plan->encap_port;
	udp->len = bpf_htons(ENCAP_OVERHEAD - sizeof(struct iphdr) + ip_length);
	udp->check = 0;
	header->magic = ENCAP_MAGIC;
	header->flags = plan->flags;
	header->version = ENCAP_VERSION;
	header->reserved = 0;
	header->former = plan->former;
	__builtin_memcpy(header->mac, &plan->mac, sizeof(plan->mac));
}

#define ENCAPSULATED_HEADERS (sizeof(struct ethhdr) + ENCAP_OVERHEAD)

/* XDP's surgery for a planned packet (seg: its IP packet's length and family): trim an Ethernet pad, grow
 * the head, write the headers, send. */
static __always_inline int encapsulate_xdp(struct xdp_md *ctx, const struct segment *seg,
					   const struct forwarding_plan *plan, __u32 outcome)
{
	__u32 ip_length = seg->ip_length;
	__u32 frame_length = ctx->data_end - ctx->data;

	/* The queue's copy ends where the IP packet does: drop an Ethernet pad, then make room. */
	if (frame_length > sizeof(struct ethhdr) + ip_length &&
	    bpf_xdp_adjust_tail(ctx, (int)(sizeof(struct ethhdr) + ip_length) - (int)frame_length))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS);
	if (bpf_xdp_adjust_head(ctx, -ENCAP_OVERHEAD))
		return count_xdp(seg, FRONT_UNSENT, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	if (data + ENCAPSULATED_HEADERS > (void *)(long)ctx->data_end)
		return count_xdp(seg, FRONT_UNSENT, XDP_DROP); /* cannot happen: room was just made */
	build_encapsulation(data, plan, ip_length);
	return count_xdp(seg, outcome, send(ctx, plan->next_hop.ifindex));
}

static __noinline int forward_xdp(struct xdp_md *ctx, const struct segment *seg, const struct front_config *cfg,
				       const struct local_copy *copy)
{
	struct forwarding_plan plan = {};
	__u32 outcome = plan_forwarding(ctx, 1, seg, cfg, copy, &plan);

	if (!forwarded(outcome))
		return count_xdp(seg, outcome, XDP_PASS);
	return encapsulate_xdp(ctx, seg, &plan, outcome);
}

/* tc's surgery: trim an Ethernet pad, make room after the Ethernet header (the flags also make the
 * skb's protocol IPv4 for an IPv6 inner packet, and record the inner headers for offloads), write the
 * headers (the Ethernet one outside a received checksum's reach, the rest inside), redirect. A GSO
 * packet (the receive path merged several) is the queue's: it hands the handler one segment at a time. */
static __always_inline int encapsulate_tc(struct __sk_buff *skb, const struct segment *seg,
					  const struct forwarding_plan *plan, __u32 outcome)
{
	__u64 headers[(ENCAPSULATED_HEADERS + 2 + 7) / 8]; /* from byte 2: the outer IPv4 header 4-aligned */
	__u8 *copy = (__u8 *)headers + 2;
	__u32 ip_length = seg->ip_length;

	if ((skb->len > sizeof(struct ethhdr) + ip_length &&
	     bpf_skb_change_tail(skb, sizeof(struct ethhdr) + ip_length, 0)) ||
	    bpf_skb_adjust_room(skb, ENCAP_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return count(seg, FRONT_UNSENT, TC_ACT_OK); /* unchanged */
	build_encapsulation(copy, plan, ip_length);
	if (bpf_skb_store_bytes(skb, 0, copy, sizeof(struct ethhdr), 0) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), copy + sizeof(struct ethhdr), ENCAP_OVERHEAD,
				BPF_F_RECOMPUTE_CSUM))
		return count(seg, FRONT_UNSENT, TC_ACT_SHOT); /* half rewritten */
	return count(seg, outcome, bpf_redirect(plan->next_hop.ifindex, 0));
}

static __noinline int forward_tc(struct __sk_buff *skb, const struct segment *seg, const struct front_config *cfg,
				      const struct local_copy *copy)
{
	struct forwarding_plan plan = {};

	if (skb->gso_segs > 1)
		return count(seg, FRONT_QUEUED, TC_ACT_OK);
	__u32 outcome = plan_forwarding(skb, 0, seg, cfg, copy, &plan);
	if (!forwarded(outcome))
		return count(seg, outcome, TC_ACT_OK);
	return encapsulate_tc(skb, seg, &plan, outcome);
}

/* --- TCP Fast Open: a SYN fastopen_decision accepted --- */

/* Encapsulated whole, data included, flagged FASTOPEN to the flow's backend (handler._forward_fastopen);
 * no forwarding configuration, Maglev entry or route: the queue's. */
static __always_inline __u32 plan_fastopen(void *ctx, int xdp, const struct segment *seg,
					   const struct local_copy *copy, struct forwarding_plan *plan)
{
	const struct front_forwarding *fwd = copied_forwarding(copy);

	if (!fwd)
		return FRONT_QUEUED;
	return plan_encapsulation(ctx, xdp, copy, seg, ENCAP_FLAG_FASTOPEN, FRONT_FASTOPEN_ACCEPTED, plan);
}

static __noinline int forward_fastopen_xdp(struct xdp_md *ctx, const struct segment *seg,
						const struct local_copy *copy)
{
	struct forwarding_plan plan = {};
	__u32 outcome = plan_fastopen(ctx, 1, seg, copy, &plan);

	if (outcome != FRONT_FASTOPEN_ACCEPTED)
		return count_xdp(seg, outcome, XDP_PASS);
	return encapsulate_xdp(ctx, seg, &plan, outcome);
}

static __noinline int forward_fastopen_tc(struct __sk_buff *skb, const struct segment *seg,
					       const struct local_copy *copy)
{
	struct forwarding_plan plan = {};
	__u32 outcome = plan_fastopen(skb, 0, seg, copy, &plan);

	if (outcome != FRONT_FASTOPEN_ACCEPTED)
		return count(seg, outcome, TC_ACT_OK);
	return encapsulate_tc(skb, seg, &plan, outcome);
}

/* --- ICMP errors about a protected flow --- */

#define NOT_OURS FRONT_COUNTER_MAX /* plan_icmp_error: not an ICMP error to a VIP, passed on uncounted */

/* An ICMP error to a VIP about a segment a protected VIP and port sent, as handler._icmp_error decides it:
 * encapsulated flagged ICMP to the backend of the quoted flow (plan_encapsulation: the flow's own hash
 * and MAC tuple), within this CPU's share of the ICMP budget. `error` is the caller's (zeroed) segment,
 * filled with the error's own addresses and length: one more here would not fit the stack. */
static __always_inline __u32 plan_icmp_error(void *ctx, int xdp, struct segment *error, const struct local_copy *copy,
					     struct forwarding_plan *plan)
{
	struct segment flow = {};
	__u32 zero = 0;

	if (!parse_icmp_error(packet_data(ctx, xdp), packet_end(ctx, xdp), error, &flow) ||
	    addresses_refused(error) || !protected_vip(copy, error->daddr))
		return NOT_OURS;
	/* The kernel checks the IPv4 header after this hook and drops what fails: nothing is decided (not
	 * even a drop, counted as the handler's) before it holds. Behind IPv4 options (which the fold does
	 * not cover) the queue decides, as for segments. */
	if (error->family == 4) {
		const struct iphdr *ip = packet_data(ctx, xdp) + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > packet_end(ctx, xdp) || ip->ihl != 5)
			return FRONT_QUEUED;
		if (ipv4_header_fold(ip))
			return FRONT_UNVERIFIED;
	}
	__u32 port = bpf_ntohs(flow.dport);
	const __u8 *port_slot = bpf_map_lookup_elem(&protected_port_slots, &port);
	if (__builtin_memcmp(error->daddr, flow.daddr, 16) || !port_slot || !*port_slot)
		return FRONT_ICMP_NOT_PROTECTED;
	const struct front_forwarding *fwd = copied_forwarding(copy);
	if (!fwd)
		return FRONT_QUEUED;
	if (error->ip_length + ENCAP_OVERHEAD > fwd->farm_mtu)
		return FRONT_TOO_BIG;
	__u32 outcome = plan_encapsulation(ctx, xdp, copy, &flow, ENCAP_FLAG_ICMP, FRONT_ICMP_FORWARDED,
					   plan);
	const struct token_limit *limit = bpf_map_lookup_elem(&icmp_limit, &zero);
	if (outcome == FRONT_ICMP_FORWARDED &&
	    (!limit || !token_take(bpf_map_lookup_elem(&icmp_budget, &zero), limit->cost_ns, limit->credit_max_ns)))
		return FRONT_ICMP_RATE_LIMITED;
	return outcome;
}

/* Not TCP and not an ICMP error (UDP, an echo request, ...), to a protected VIP: the rules queue neither
 * (the ICMP errors they queue the handler counts), and the VIP's blackhole route drops it, which no kernel
 * counter shows (Ip:InReceives only), so the programs count it `not_protected` as they do TCP to another
 * port; from a source the kernel refuses (addresses_refused) it is left uncounted, as TCP is. IPv4 ICMP
 * behind IP options is left uncounted: its type lies at an offset this does not walk. */
static __always_inline int other_to_vip(void *ctx, int xdp, struct segment *seg, const struct local_copy *copy)
{
	void *data_end = packet_end(ctx, xdp);
	struct ethhdr *eth = packet_data(ctx, xdp);
	__u8 *icmp = 0;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
			return 0;
		if (ip->protocol == IPPROTO_ICMP) {
			if (ip->ihl != 5)
				return 0;
			icmp = (void *)(ip + 1);
		}
		ipv4_mapped(seg->saddr, &ip->saddr);
		ipv4_mapped(seg->daddr, &ip->daddr);
		seg->family = 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return 0;
		if (ip6->nexthdr == PROTO_ICMPV6)
			icmp = (void *)(ip6 + 1);
		__builtin_memcpy(seg->saddr, &ip6->saddr, 16);
		__builtin_memcpy(seg->daddr, &ip6->daddr, 16);
		seg->family = 6;
	} else {
		return 0;
	}
	if (icmp && ((void *)(icmp + 1) > data_end || icmp_error_type(seg->family, icmp[0])))
		return 0;
	return !addresses_refused(seg) && protected_vip(copy, seg->daddr) != 0;
}

/* What the handler drops, the programs drop; the rest they cannot forward is left to the queue. */
static __always_inline int icmp_dropped(__u32 outcome)
{
	return outcome == FRONT_ICMP_NOT_PROTECTED || outcome == FRONT_ICMP_RATE_LIMITED;
}

static __noinline int forward_icmp_error_xdp(struct xdp_md *ctx, struct segment *error, const struct local_copy *copy)
{
	struct forwarding_plan plan = {};
	__u32 outcome = plan_icmp_error(ctx, 1, error, copy, &plan);

	if (outcome == NOT_OURS)
		return other_to_vip(ctx, 1, error, copy) ? count_xdp(error, FRONT_NOT_PROTECTED, XDP_PASS) : XDP_PASS;
	if (outcome != FRONT_ICMP_FORWARDED)
		return count_xdp(error, outcome, icmp_dropped(outcome) ? XDP_DROP : XDP_PASS);
	return encapsulate_xdp(ctx, error, &plan, outcome);
}

static __noinline int forward_icmp_error_tc(struct __sk_buff *skb, struct segment *error,
					 const struct local_copy *copy)
{
	struct forwarding_plan plan = {};
	__u32 outcome = plan_icmp_error(skb, 0, error, copy, &plan);

	if (outcome == NOT_OURS)
		return other_to_vip(skb, 0, error, copy) ? count(error, FRONT_NOT_PROTECTED, TC_ACT_OK) : TC_ACT_OK;
	if (outcome != FRONT_ICMP_FORWARDED)
		return count(error, outcome, icmp_dropped(outcome) ? TC_ACT_SHOT : TC_ACT_OK);
	return encapsulate_tc(skb, error, &plan, outcome);
}

/* --- The entries: one set of decisions for every frame, each hook's own answer_syn and forward --- */

/* A frame either hook passed its own checks for: what both do with it. */
static __always_inline int handle_frame(void *ctx, int xdp, const struct front_config *cfg)
{
	__u32 path = xdp ? FRONT_PATH_XDP : FRONT_PATH_TC;
	int pass = xdp ? XDP_PASS : TC_ACT_OK;
	struct segment seg = {};

	enum parsed parsed = parse_frame(packet_data(ctx, xdp), packet_end(ctx, xdp), &seg);
	struct local_copy *copy = local_copy(cfg);
	if (!copy)
		return pass;
	if (parsed == PARSE_OTHER) /* not TCP: an ICMP error about a protected flow, or not ours */
		return xdp ? forward_icmp_error_xdp(ctx, &seg, copy) : forward_icmp_error_tc(ctx, &seg, copy);
	if (addresses_refused(&seg))
		return pass;
	const __u8 *vip_slot = protected_vip(copy, seg.daddr);
	if (!vip_slot)
		return parsed == PARSE_SEGMENT ? count_on(path, &seg, FRONT_NOT_PROTECTED, pass) : pass;
	if (parsed == PARSE_UNHANDLED)
		return count_on(path, &seg, FRONT_UNPARSED, pass);
	__u32 port = bpf_ntohs(seg.dport);
	const __u8 *port_slot = bpf_map_lookup_elem(&protected_port_slots, &port);
	if (!port_slot || !*port_slot)
		return count_on(path, &seg, FRONT_NOT_PROTECTED, pass);
	if (*vip_slot && *vip_slot <= VIP_PORT_SLOTS && *port_slot <= VIP_PORT_SLOTS)
		seg.vip_port = (*vip_slot - 1) * VIP_PORT_SLOTS + *port_slot;
	if (seg.flags & TCP_FLAG_SYN) {
		if (seg.flags & (TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN))
			return count_on(path, &seg, FRONT_QUEUED, pass); /* the handler drops it: invalid_flags */
		int verdict = xdp ? answer_syn_xdp(ctx, &seg, cfg, copy) : answer_syn(ctx, &seg, cfg, copy);

		if (verdict == FASTOPEN_FORWARD)
			return xdp ? forward_fastopen_xdp(ctx, &seg, copy) : forward_fastopen_tc(ctx, &seg, copy);
		return verdict;
	}
	return xdp ? forward_xdp(ctx, &seg, cfg, copy) : forward_tc(ctx, &seg, cfg, copy);
}

SEC("tc")
int synproxy_front(struct __sk_buff *skb)
{
	__u32 zero = 0;
	const struct front_config *cfg = bpf_map_lookup_elem(&config, &zero);

	/* A VLAN tag the device took off stays in the skb: the route back and the redirect would not
	 * carry it, so tagged traffic goes the kernel's way. */
	if (!cfg || !cfg->period_ns || skb->pkt_type != PACKET_HOST || skb->vlan_present)
		return TC_ACT_OK;
	return handle_frame(skb, 0, cfg);
}

SEC("xdp")
int synproxy_front_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;
	const struct front_config *cfg = bpf_map_lookup_elem(&config, &zero);

	/* Multicast and broadcast frames are not for one host (XDP has no pkt_type: a unicast frame for
	 * another host reaches it only in promiscuous mode). */
	if (!cfg || !cfg->period_ns || (void *)(eth + 1) > data_end || (eth->h_dest[0] & 1))
		return XDP_PASS;
	return handle_frame(ctx, 1, cfg);
}

char LICENSE[] SEC("license") = "GPL";
