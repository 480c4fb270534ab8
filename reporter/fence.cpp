#include "fence.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace hotpool::reporter {

namespace {
long membarrier(int command) { return syscall(SYS_membarrier, command, 0, 0); }
}  // namespace

bool init_asymmetric_fences() {
  const long supported = membarrier(MEMBARRIER_CMD_QUERY);
  const bool ok = supported > 0 && (supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
                  membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
  g_asymmetric_fences.store(ok, std::memory_order_relaxed);
  return ok;
}

bool heavy_fence() { return membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0; }

}  // namespace hotpool::reporter
