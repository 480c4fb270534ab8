// Asymmetric fences: a Dekker-style handshake between a thread that acts
// often (a sampled allocation) and one that acts rarely (a report), where
// the frequent side pays only compiler barriers and the rare side a
// membarrier(2) system call, which makes every running thread of the
// process execute a full memory barrier before it returns (as liburcu's
// membarrier flavour and folly's asymmetric barriers do).
//
// Pattern: the frequent side stores its flag, light_fence(), then loads the
// other side's flag; the rare side stores its flag, heavy_fence(), then
// loads the frequent side's. One of the two then sees the other's store.
//
// membarrier needs registering once per process (and again in a fork
// child: the registration belongs to the address space). Without it
// (an old kernel, a seccomp filter) asymmetric_fences() is false and the
// callers keep their lock-prefixed protocol.
#pragma once

#include <atomic>

namespace hotpool::reporter {

// Registers the process; false when membarrier is not available. Call
// before other threads use the fences (start-up, a fork child).
// Set at start-up and in a fork child only (one thread then), so that a
// handshake never changes protocol midway.
bool init_asymmetric_fences();
inline constinit std::atomic<bool> g_asymmetric_fences{false};
inline bool asymmetric_fences() { return g_asymmetric_fences.load(std::memory_order_relaxed); }

inline void light_fence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
// Only when asymmetric_fences(): a full barrier on every running thread;
// false if the kernel refused it (the handshake must then be given up).
bool heavy_fence();

}  // namespace hotpool::reporter
