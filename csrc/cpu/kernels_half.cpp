// CPU kernels instantiated for float16.
#include "kernels_impl.h"

CONDSEG_CPU_INSTANTIATE(c10::Half)
