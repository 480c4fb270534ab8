// Symbolization at report time, through libhotpool-symbolize.so when it can
// be loaded (see symbolizer_loader.cpp). Call under the recursion guard.
#pragma once

#include <cstdint>

#include "reporter/symbolize.h"

namespace hotpool::shim {

// The symbol of a captured return address; valid until the next call.
const reporter::Symbol* symbolize(uintptr_t return_address);

}  // namespace hotpool::shim
