// Symbolization at report time, through libhotpool-symbolize.so when it can
// be loaded (see symbolizer_loader.cpp). Call under the recursion guard.
#pragma once

#include <cstdint>

#include "reporter/symbolize.h"

namespace hotpool::shim {

void symbolize(uintptr_t return_address, reporter::Symbol* out);

}  // namespace hotpool::shim
