// CPU kernels instantiated for float32.
#include "kernels_impl.h"

CONDSEG_CPU_INSTANTIATE(float)
