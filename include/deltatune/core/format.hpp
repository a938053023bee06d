// The one fmt deltatune formats with: the copy LibTorch ships in its include folder.
//
// torch >= 2.10 installs fmt 12 headers next to its own. Its include folder comes
// before /usr/include on every consumer's command line, so <fmt/format.h> means
// torch's copy whatever else is installed; linking Debian's libfmt (fmt 9) against
// those headers would mix two ABIs. So we use torch's fmt, header-only
// (FMT_HEADER_ONLY is set by the deltatune::deltatune target), and link no fmt library.
#pragma once

#ifndef FMT_HEADER_ONLY
#define FMT_HEADER_ONLY
#endif
#include <fmt/format.h>
#include <fmt/ranges.h>

#if FMT_VERSION < 100000
#error "deltatune formats with the fmt headers LibTorch >= 2.10 ships; an older fmt came first on the include path"
#endif
