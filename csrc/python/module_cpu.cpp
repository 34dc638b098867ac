// Python entry point of fastrnn._C (schemas and CPU kernels).
#define FASTRNN_MODULE_NAME _C
#include "module.h"
