// fastrnn C++ test: a call of fastrnn::rnn_backward through torch's full
// (non-stable) dispatcher, for the test's backward checks.
//
// torch's stable C API torch_call_dispatcher (torch 2.14.1, and pytorch main
// as of this writing) converts an op's returns with the types in reverse
// order: it pops the last return first but converts it with
// schema.returns()[0]'s type. With returns (Tensor, Tensor, Tensor[]) it
// converts the Tensor[] as a Tensor and fails ("Expected Tensor but got
// GenericList"), so fastrnn::rnn_backward cannot be called through it; the
// forward op (three Tensors) can. This helper lives in its own translation
// unit because the full dispatcher headers refuse TORCH_TARGET_VERSION.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <cstdint>
#include <vector>

namespace fastrnn_test {

// The arguments of fastrnn::rnn_backward (ops.h); tensors are borrowed,
// batch_sizes may be null (padded). Returns new owning handles.
struct BackwardResult {
  AtenTensorHandle grad_input = nullptr, grad_hx = nullptr;
  std::vector<AtenTensorHandle> grad_weights;
};

BackwardResult call_rnn_backward(AtenTensorHandle input, AtenTensorHandle hx,
                                 const std::vector<AtenTensorHandle>& weights, bool has_biases,
                                 int64_t num_layers, double dropout, bool train,
                                 bool bidirectional, const char* nonlinearity,
                                 AtenTensorHandle batch_sizes, AtenTensorHandle output,
                                 AtenTensorHandle reserve, AtenTensorHandle grad_output,
                                 AtenTensorHandle grad_h_n, bool need_input_grad,
                                 bool need_weight_grad);

}  // namespace fastrnn_test
