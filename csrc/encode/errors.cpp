// The library's error channel (see fl_common.h); one definition per library.
#include "fl_common.h"
FL_DEFINE_LAST_ERROR
