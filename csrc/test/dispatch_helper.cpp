// See dispatch_helper.h. Compiled without TORCH_TARGET_VERSION (full ATen).
#include "dispatch_helper.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <string>

namespace fastrnn_test {

BackwardResult call_rnn_backward(AtenTensorHandle input, AtenTensorHandle hx,
                                 const std::vector<AtenTensorHandle>& weights, bool has_biases,
                                 int64_t num_layers, double dropout, bool train,
                                 bool bidirectional, const char* nonlinearity,
                                 AtenTensorHandle batch_sizes, AtenTensorHandle output,
                                 AtenTensorHandle reserve, AtenTensorHandle grad_output,
                                 AtenTensorHandle grad_h_n, bool need_input_grad,
                                 bool need_weight_grad) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  auto t = [](AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); };
  std::vector<at::Tensor> ws;
  for (AtenTensorHandle w : weights) ws.push_back(t(w));
  std::vector<c10::IValue> stack{
      t(input), t(hx), ws, has_biases, num_layers, dropout, train, bidirectional,
      std::string(nonlinearity), batch_sizes ? c10::IValue(t(batch_sizes)) : c10::IValue(),
      t(output), t(reserve), t(grad_output), t(grad_h_n), need_input_grad, need_weight_grad};
  c10::Dispatcher::singleton().findSchemaOrThrow("fastrnn::rnn_backward", "").callBoxed(stack);
  auto handle = [](at::Tensor tensor) {
    return torch::aot_inductor::new_tensor_handle(std::move(tensor));
  };
  BackwardResult r;
  r.grad_input = handle(stack.at(0).toTensor());
  r.grad_hx = handle(stack.at(1).toTensor());
  for (const c10::IValue& g : stack.at(2).toList()) r.grad_weights.push_back(handle(g.toTensor()));
  return r;
}

}  // namespace fastrnn_test
