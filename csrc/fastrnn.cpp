// fastrnn op schemas: defined once here; each device registers its kernels
// from its own file (csrc/cpu, csrc/cuda). Contracts are in elman.h.
#include "elman.h"

STABLE_TORCH_LIBRARY(fastrnn, m) {
  m.def(fastrnn::kForwardSchema);
  m.def(fastrnn::kBackwardSchema);
}
