// fastrnn op schemas: defined once here; each device registers its kernels
// from its own file (csrc/cpu, csrc/cuda). Contracts are in ops.h.
#include "ops.h"

STABLE_TORCH_LIBRARY(fastrnn, m) {
  m.def(fastrnn::kRnnSchema);
  m.def(fastrnn::kRnnBackwardSchema);
  m.def(fastrnn::kLstmSchema);
  m.def(fastrnn::kLstmBackwardSchema);
  m.def(fastrnn::kGruSchema);
  m.def(fastrnn::kGruBackwardSchema);
}
