// Python entry point of fastrnn._C_cuda (CUDA kernels, loaded only when torch has CUDA).
#define FASTRNN_MODULE_NAME _C_cuda
#include "module.h"
