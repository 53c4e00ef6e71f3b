// CPU kernels instantiated for float64 (gradcheck).
#include "kernels_impl.h"

CONDSEG_CPU_INSTANTIATE(double)
