// CPU kernels instantiated for bfloat16.
#include "kernels_impl.h"

CONDSEG_CPU_INSTANTIATE(c10::BFloat16)
