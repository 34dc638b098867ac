// C++ test of fastrnn's CPU kernels, called through torch's dispatcher exactly
// as a C++ user of libfastrnn would (no Python involved).
//
// For whole stacks (1-3 layers, one or two directions, tanh/relu, with and
// without biases, padded and packed, dropout) it checks
//   * fastrnn::rnn (output, h_n and the reserve: the layer outputs and dropout
//     masks) against a naive per-sequence loop,
//   * fastrnn::rnn_backward (every gradient) against a naive backprop loop,
//     with the masks the forward drew (read back from the reserve); called
//     through dispatch_helper.h, as torch's stable torch_call_dispatcher
//     cannot return its Tensor[] (a torch bug, described there),
//   * fastrnn::rnn_backward against central finite differences of
//     fastrnn::rnn (so the op's forward and backward agree with each other,
//     independently of the naive reference; deterministic configurations),
// plus need_input_grad / need_weight_grad = false, a float32 run and argument
// errors. Exit status 0 on success; every mismatch is printed.
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/version.h>

#include "dispatch_helper.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using Vec = std::vector<double>;

int g_failures = 0;
int g_checks = 0;

// ---------------------------------------------------------------- tensors

Tensor make_tensor(const std::vector<int64_t>& shape, const Vec& values,
                   ScalarType dtype = ScalarType::Double) {
  Tensor t = torch::stable::empty(shape, dtype);
  if (t.numel() != static_cast<int64_t>(values.size())) {
    throw std::runtime_error("make_tensor: size mismatch");
  }
  if (dtype == ScalarType::Double) {
    std::copy(values.begin(), values.end(), t.mutable_data_ptr<double>());
  } else if (dtype == ScalarType::Float) {
    std::copy(values.begin(), values.end(), t.mutable_data_ptr<float>());
  } else {
    throw std::runtime_error("make_tensor: unsupported dtype");
  }
  return t;
}

Tensor make_long(const std::vector<int64_t>& values) {
  Tensor t = torch::stable::empty({static_cast<int64_t>(values.size())}, ScalarType::Long);
  std::copy(values.begin(), values.end(), t.mutable_data_ptr<int64_t>());
  return t;
}

std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d) s.push_back(t.size(d));
  return s;
}

Vec values_of(const Tensor& t) {
  const Tensor c = torch::stable::contiguous(t);
  Vec v(c.numel());
  if (c.scalar_type() == ScalarType::Double) {
    std::copy_n(c.const_data_ptr<double>(), v.size(), v.begin());
  } else if (c.scalar_type() == ScalarType::Float) {
    std::copy_n(c.const_data_ptr<float>(), v.size(), v.begin());
  } else {
    throw std::runtime_error("values_of: unsupported dtype");
  }
  return v;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// ---------------------------------------------------------------- checks

void fail(const std::string& what) {
  ++g_failures;
  std::printf("FAIL %s\n", what.c_str());
}

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) fail(what);
}

// |got - want| <= atol + rtol * |want| elementwise; prints the worst element.
void check_close(const std::string& what, const Vec& g, const Vec& want, double atol,
                 double rtol) {
  ++g_checks;
  if (g.size() != want.size()) {
    fail(what + ": " + std::to_string(g.size()) + " values, expected " +
         std::to_string(want.size()));
    return;
  }
  int64_t worst = -1;
  double worst_excess = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double excess = std::abs(g[i] - want[i]) - (atol + rtol * std::abs(want[i]));
    if (!(excess <= 0.0) && (worst < 0 || !(excess <= worst_excess))) {
      worst = static_cast<int64_t>(i);
      worst_excess = excess;
    }
  }
  if (worst >= 0) {
    char buf[256];
    std::snprintf(buf, sizeof(buf), ": element %lld got %.17g, expected %.17g (|diff| %.3g)",
                  static_cast<long long>(worst), g[worst], want[worst],
                  std::abs(g[worst] - want[worst]));
    fail(what + buf);
  }
}

void check_close(const std::string& what, const Tensor& got,
                 const std::vector<int64_t>& want_shape, const Vec& want, double atol,
                 double rtol) {
  if (shape_of(got) != want_shape) {
    ++g_checks;
    fail(what + ": shape " + shape_str(shape_of(got)) + ", expected " + shape_str(want_shape));
    return;
  }
  check_close(what, values_of(got), want, atol, rtol);
}

// ---------------------------------------------------------------- problem

// Deterministic values in [-scale, scale).
struct Lcg {
  uint64_t s;
  double next(double scale) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return scale * (2.0 * static_cast<double>(s >> 11) / 9007199254740992.0 - 1.0);
  }
  Vec fill(size_t n, double scale) {
    Vec v(n);
    for (double& x : v) x = next(scale);
    return v;
  }
};

// A whole stack and its input, with the weights in torch.nn.RNN's flat order:
// per cell (layer l, direction d; cell = l * D + d) weight_ih [H, I_l],
// weight_hh [H, H], then bias_ih [H], bias_hh [H] when bias.
struct Problem {
  std::string name;
  int64_t L = 1, D = 1, T = 0, B = 0, I = 0, H = 0;
  bool bias = true, relu = false, packed = false;
  double dropout = 0.0;
  bool train = false;
  std::vector<int64_t> batch_sizes;  // [T]; all B when padded
  std::vector<int64_t> offsets;      // [T], first row of each step
  int64_t N = 0;                     // rows
  Vec x, hx;                         // [N * I], [L*D * B * H]
  std::vector<Vec> w;                // the flat weights
  Vec gy, gh_n;                      // upstream gradients: [N * D*H], [L*D * B * H]

  int64_t W() const { return D * H; }
  int64_t cells() const { return L * D; }
  int64_t per_cell() const { return bias ? 4 : 2; }
  int64_t in_size(int64_t l) const { return l == 0 ? I : D * H; }
  bool dropout_applied() const { return train && dropout > 0 && L > 1; }
  std::string nonlinearity() const { return relu ? "relu" : "tanh"; }
  std::vector<int64_t> weight_shape(size_t i) const {
    const int64_t cell = static_cast<int64_t>(i) / per_cell(), k = static_cast<int64_t>(i) % per_cell();
    if (k == 0) return {H, in_size(cell / D)};
    if (k == 1) return {H, H};
    return {H};
  }
  std::vector<int64_t> in_shape() const {
    return packed ? std::vector<int64_t>{N, I} : std::vector<int64_t>{T, B, I};
  }
  std::vector<int64_t> out_shape() const {
    return packed ? std::vector<int64_t>{N, W()} : std::vector<int64_t>{T, B, W()};
  }
  std::vector<int64_t> state_shape() const { return {cells(), B, H}; }
  // Steps of sequence b in the order the recurrence visits them.
  std::vector<int64_t> order(int64_t b, bool reverse) const {
    std::vector<int64_t> ts;
    for (int64_t t = 0; t < T; ++t) {
      if (batch_sizes[t] > b) ts.push_back(t);
    }
    if (reverse) std::reverse(ts.begin(), ts.end());
    return ts;
  }
  int64_t row(int64_t t, int64_t b) const { return offsets[t] + b; }
};

Problem make_problem(std::string name, int64_t L, int64_t D, int64_t B, int64_t I, int64_t H,
                     std::vector<int64_t> batch_sizes, bool packed, bool relu, bool bias,
                     uint64_t seed, double dropout = 0.0, bool train = false) {
  Problem p;
  p.name = std::move(name);
  p.L = L;
  p.D = D;
  p.T = static_cast<int64_t>(batch_sizes.size());
  p.B = B;
  p.I = I;
  p.H = H;
  p.packed = packed;
  p.relu = relu;
  p.bias = bias;
  p.dropout = dropout;
  p.train = train;
  p.batch_sizes = std::move(batch_sizes);
  p.offsets.resize(p.T);
  for (int64_t t = 0; t < p.T; ++t) {
    p.offsets[t] = p.N;
    p.N += p.batch_sizes[t];
  }
  Lcg rng{seed};
  p.x = rng.fill(p.N * I, 1.0);
  p.hx = rng.fill(p.cells() * B * H, 0.8);
  for (int64_t i = 0; i < p.cells() * p.per_cell(); ++i) {
    const std::vector<int64_t> s = p.weight_shape(i);
    const int64_t n = s.size() == 2 ? s[0] * s[1] : s[0];
    p.w.push_back(rng.fill(n, s.size() == 2 ? 0.5 : 0.3));
  }
  p.gy = rng.fill(p.N * p.W(), 1.0);
  p.gh_n = rng.fill(p.cells() * B * H, 1.0);
  return p;
}

std::string label(const Problem& p) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), "%s (L%lld D%lld %s %s %s%s)", p.name.c_str(),
                static_cast<long long>(p.L), static_cast<long long>(p.D),
                p.packed ? "packed" : "padded", p.relu ? "relu" : "tanh",
                p.bias ? "bias" : "no-bias",
                p.dropout_applied() ? (" dropout " + std::to_string(p.dropout)).c_str() : "");
  return buf;
}

// ---------------------------------------------------------------- reference

double act(const Problem& p, double a) { return p.relu ? std::max(a, 0.0) : std::tanh(a); }
double act_grad(const Problem& p, double h) { return p.relu ? (h > 0.0 ? 1.0 : 0.0) : 1.0 - h * h; }

struct RefForward {
  std::vector<Vec> layer_out;  // [N * W] per layer; the last is the output
  Vec h_n;                     // [L*D * B * H]
};

// Layer l's input: x, or the previous layer's output times its mask.
Vec layer_input(const Problem& p, const RefForward& f, const std::vector<Vec>& masks, int64_t l) {
  if (l == 0) return p.x;
  Vec in = f.layer_out[l - 1];
  if (!masks.empty()) {
    for (size_t i = 0; i < in.size(); ++i) in[i] *= masks[l - 1][i];
  }
  return in;
}

RefForward naive_forward(const Problem& p, const std::vector<Vec>& masks) {
  const int64_t H = p.H, W = p.W();
  RefForward r{{}, Vec(p.cells() * p.B * H)};
  for (int64_t l = 0; l < p.L; ++l) {
    const Vec in = layer_input(p, r, masks, l);
    const int64_t In = p.in_size(l);
    Vec out(p.N * W);
    for (int64_t d = 0; d < p.D; ++d) {
      const int64_t cell = l * p.D + d, first = cell * p.per_cell();
      const Vec &w_ih = p.w[first], &w_hh = p.w[first + 1];
      for (int64_t b = 0; b < p.B; ++b) {
        Vec h(p.hx.begin() + (cell * p.B + b) * H, p.hx.begin() + (cell * p.B + b + 1) * H);
        for (int64_t t : p.order(b, d == 1)) {
          const int64_t row = p.row(t, b);
          Vec h_new(H);
          for (int64_t k = 0; k < H; ++k) {
            double a = 0.0;
            for (int64_t i = 0; i < In; ++i) a += in[row * In + i] * w_ih[k * In + i];
            if (p.bias) a += p.w[first + 2][k] + p.w[first + 3][k];
            for (int64_t j = 0; j < H; ++j) a += h[j] * w_hh[k * H + j];
            h_new[k] = act(p, a);
          }
          h = h_new;
          std::copy(h.begin(), h.end(), out.begin() + row * W + d * H);
        }
        std::copy(h.begin(), h.end(), r.h_n.begin() + (cell * p.B + b) * H);
      }
    }
    r.layer_out.push_back(out);
  }
  return r;
}

struct RefGrads {
  Vec input, hx;
  std::vector<Vec> w;
};

RefGrads naive_backward(const Problem& p, const RefForward& f, const std::vector<Vec>& masks) {
  const int64_t H = p.H, W = p.W();
  RefGrads g{{}, Vec(p.cells() * p.B * H), {}};
  for (const Vec& w : p.w) g.w.emplace_back(w.size(), 0.0);
  Vec dY = p.gy;
  for (int64_t l = p.L - 1; l >= 0; --l) {
    const Vec in = layer_input(p, f, masks, l);
    const int64_t In = p.in_size(l);
    const Vec& out = f.layer_out[l];
    Vec dX(p.N * In, 0.0);
    for (int64_t d = 0; d < p.D; ++d) {
      const int64_t cell = l * p.D + d, first = cell * p.per_cell();
      const Vec &w_ih = p.w[first], &w_hh = p.w[first + 1];
      for (int64_t b = 0; b < p.B; ++b) {
        const std::vector<int64_t> ts = p.order(b, d == 1);
        const double* h0 = &p.hx[(cell * p.B + b) * H];
        Vec dh(p.gh_n.begin() + (cell * p.B + b) * H, p.gh_n.begin() + (cell * p.B + b + 1) * H);
        for (int64_t s = static_cast<int64_t>(ts.size()) - 1; s >= 0; --s) {
          const int64_t row = p.row(ts[s], b);
          const double* h = &out[row * W + d * H];
          const double* h_prev = s > 0 ? &out[p.row(ts[s - 1], b) * W + d * H] : h0;
          Vec dA(H);
          for (int64_t k = 0; k < H; ++k) dA[k] = (dY[row * W + d * H + k] + dh[k]) * act_grad(p, h[k]);
          for (int64_t k = 0; k < H; ++k) {
            for (int64_t i = 0; i < In; ++i) {
              dX[row * In + i] += dA[k] * w_ih[k * In + i];
              g.w[first][k * In + i] += dA[k] * in[row * In + i];
            }
            for (int64_t j = 0; j < H; ++j) g.w[first + 1][k * H + j] += dA[k] * h_prev[j];
            if (p.bias) {
              g.w[first + 2][k] += dA[k];
              g.w[first + 3][k] += dA[k];
            }
          }
          for (int64_t j = 0; j < H; ++j) {
            double a = 0.0;
            for (int64_t k = 0; k < H; ++k) a += dA[k] * w_hh[k * H + j];
            dh[j] = a;
          }
        }
        std::copy(dh.begin(), dh.end(), g.hx.begin() + (cell * p.B + b) * H);
      }
    }
    if (l > 0) {
      if (!masks.empty()) {
        for (size_t i = 0; i < dX.size(); ++i) dX[i] *= masks[l - 1][i];
      }
      dY = dX;
    } else {
      g.input = dX;
    }
  }
  return g;
}

// ---------------------------------------------------------------- the ops

struct OpForward {
  Tensor out, h_n, reserve;
};

std::optional<Tensor> batch_sizes_of(const Problem& p) {
  if (!p.packed) return std::nullopt;
  return make_long(p.batch_sizes);
}

std::vector<Tensor> weight_tensors(const Problem& p, ScalarType dtype) {
  std::vector<Tensor> ws;
  for (size_t i = 0; i < p.w.size(); ++i) ws.push_back(make_tensor(p.weight_shape(i), p.w[i], dtype));
  return ws;
}

// The eleven arguments of fastrnn::rnn (a reserve asked for).
std::vector<StableIValue> rnn_args(const Problem& p, ScalarType dtype,
                                   std::vector<Tensor> weights, const std::string& nonlinearity,
                                   std::vector<int64_t> hx_shape) {
  using torch::stable::detail::from;
  return {from(make_tensor(p.in_shape(), p.x, dtype)),
          from(make_tensor(hx_shape, p.hx, dtype)),
          from(weights),
          from(p.bias),
          from(p.L),
          from(p.dropout),
          from(p.train),
          from(p.D == 2),
          from(nonlinearity),
          from(batch_sizes_of(p)),
          from(true)};
}

void call(const char* op, std::vector<StableIValue>& stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION));
}

OpForward op_forward(const Problem& p, ScalarType dtype = ScalarType::Double) {
  std::vector<StableIValue> stack =
      rnn_args(p, dtype, weight_tensors(p, dtype), p.nonlinearity(), p.state_shape());
  call("fastrnn::rnn", stack);
  using torch::stable::detail::to;
  return {to<Tensor>(stack[0]), to<Tensor>(stack[1]), to<Tensor>(stack[2])};
}

struct OpGrads {
  Tensor input, hx;
  std::vector<Tensor> w;
};

// Through dispatch_helper.h: torch_call_dispatcher cannot return rnn_backward's
// (Tensor, Tensor, Tensor[]) (a torch bug, described there).
OpGrads op_backward(const Problem& p, const OpForward& f, bool need_input = true,
                    bool need_weight = true) {
  const Tensor input = make_tensor(p.in_shape(), p.x), hx = make_tensor(p.state_shape(), p.hx);
  const std::vector<Tensor> weights = weight_tensors(p, ScalarType::Double);
  const std::optional<Tensor> batch_sizes = batch_sizes_of(p);
  const Tensor grad_output = make_tensor(p.out_shape(), p.gy);
  const Tensor grad_h_n = make_tensor(p.state_shape(), p.gh_n);
  std::vector<AtenTensorHandle> weight_handles;
  for (const Tensor& w : weights) weight_handles.push_back(w.get());
  const std::string nonlinearity = p.nonlinearity();
  fastrnn_test::BackwardResult r = fastrnn_test::call_rnn_backward(
      input.get(), hx.get(), weight_handles, p.bias, p.L, p.dropout, p.train, p.D == 2,
      nonlinearity.c_str(), batch_sizes ? batch_sizes->get() : nullptr, f.out.get(),
      f.reserve.get(), grad_output.get(), grad_h_n.get(), need_input, need_weight);
  OpGrads g{Tensor(r.grad_input), Tensor(r.grad_hx), {}};
  for (AtenTensorHandle h : r.grad_weights) g.w.emplace_back(h);
  return g;
}

// The reserve's dropout masks ([N * W] each, after the L-1 layer outputs).
std::vector<Vec> masks_of(const Problem& p, const Tensor& reserve) {
  std::vector<Vec> masks;
  if (!p.dropout_applied()) return masks;
  const Vec r = values_of(reserve);
  const size_t per = p.N * p.W();
  for (int64_t l = 0; l + 1 < p.L; ++l) {
    const auto begin = r.begin() + (p.L - 1 + l) * per;
    masks.emplace_back(begin, begin + per);
  }
  return masks;
}

// sum(gy * output) + sum(gh_n * h_n) of the op's forward: the scalar whose
// gradient rnn_backward computes.
double op_loss(const Problem& p) {
  const OpForward f = op_forward(p);
  const Vec out = values_of(f.out), h_n = values_of(f.h_n);
  double l = 0.0;
  for (size_t i = 0; i < out.size(); ++i) l += p.gy[i] * out[i];
  for (size_t i = 0; i < h_n.size(); ++i) l += p.gh_n[i] * h_n[i];
  return l;
}

// Central differences of op_loss with respect to every element of v (a member of p).
Vec finite_differences(Problem& p, Vec& v) {
  constexpr double eps = 1e-6;
  Vec grad(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double saved = v[i];
    v[i] = saved + eps;
    const double up = op_loss(p);
    v[i] = saved - eps;
    const double down = op_loss(p);
    v[i] = saved;
    grad[i] = (up - down) / (2 * eps);
  }
  return grad;
}

// ---------------------------------------------------------------- tests

void test_problem(Problem p, bool with_finite_differences) {
  const std::string L = label(p);
  const OpForward f = op_forward(p);
  const int64_t per = p.N * p.W();
  check(shape_of(f.reserve) ==
            std::vector<int64_t>{(p.L - 1) * per * (p.dropout_applied() ? 2 : 1)},
        L + ": reserve shape " + shape_str(shape_of(f.reserve)));
  const std::vector<Vec> masks = masks_of(p, f.reserve);
  const double keep = 1.0 - p.dropout;
  for (size_t l = 0; l < masks.size(); ++l) {
    bool values_ok = true, has_zero = false, has_kept = false;
    for (double m : masks[l]) {
      has_zero |= m == 0.0;
      has_kept |= m != 0.0;
      values_ok &= m == 0.0 || (keep > 0 && std::abs(m - 1.0 / keep) < 1e-12);
    }
    check(values_ok, L + ": mask " + std::to_string(l) + " has values other than 0 and 1/(1-p)");
    check(has_zero && (keep == 0.0 || has_kept),
          L + ": mask " + std::to_string(l) + " is not a mix of zeros and kept elements");
  }

  const RefForward ref = naive_forward(p, masks);
  check_close(L + ": forward output", f.out, p.out_shape(), ref.layer_out.back(), 1e-12, 1e-12);
  check_close(L + ": forward h_n", f.h_n, p.state_shape(), ref.h_n, 1e-12, 1e-12);
  const Vec reserve = values_of(f.reserve);
  for (int64_t l = 0; l + 1 < p.L; ++l) {
    check_close(L + ": reserve layer output " + std::to_string(l),
                Vec(reserve.begin() + l * per, reserve.begin() + (l + 1) * per), ref.layer_out[l],
                1e-12, 1e-12);
  }

  // Backward from the op's own output and reserve (what autograd saves).
  const RefGrads g = naive_backward(p, ref, masks);
  const OpGrads og = op_backward(p, f);
  check_close(L + ": grad_input", og.input, p.in_shape(), g.input, 1e-11, 1e-11);
  check_close(L + ": grad_hx", og.hx, p.state_shape(), g.hx, 1e-11, 1e-11);
  check(og.w.size() == p.w.size(), L + ": number of weight gradients");
  for (size_t i = 0; i < og.w.size() && i < p.w.size(); ++i) {
    check_close(L + ": grad weight " + std::to_string(i), og.w[i], p.weight_shape(i), g.w[i],
                1e-11, 1e-11);
  }
  if (!with_finite_differences) return;

  // The op's backward is the gradient of the op's forward.
  constexpr double fd_tol = 1e-6;
  check_close(L + ": grad_input vs finite differences", og.input, p.in_shape(),
              finite_differences(p, p.x), fd_tol, fd_tol);
  check_close(L + ": grad_hx vs finite differences", og.hx, p.state_shape(),
              finite_differences(p, p.hx), fd_tol, fd_tol);
  for (size_t i = 0; i < og.w.size() && i < p.w.size(); ++i) {
    check_close(L + ": grad weight " + std::to_string(i) + " vs finite differences", og.w[i],
                p.weight_shape(i), finite_differences(p, p.w[i]), fd_tol, fd_tol);
  }
}

// Gradients that are not asked for come back as empty [0] tensors; the rest
// are unaffected.
void test_partial_grads(const Problem& p) {
  const std::string L = label(p) + " partial";
  const OpForward f = op_forward(p);
  const RefGrads g = naive_backward(p, naive_forward(p, masks_of(p, f.reserve)),
                                    masks_of(p, f.reserve));
  const OpGrads weights_only = op_backward(p, f, /*need_input=*/false, /*need_weight=*/true);
  check(shape_of(weights_only.input) == std::vector<int64_t>{0}, L + ": grad_input not empty [0]");
  check_close(L + ": grad_hx (weights only)", weights_only.hx, p.state_shape(), g.hx, 1e-11, 1e-11);
  check_close(L + ": grad weight_hh_l0 (weights only)", weights_only.w[1], {p.H, p.H}, g.w[1],
              1e-11, 1e-11);

  const OpGrads input_only = op_backward(p, f, true, false);
  bool all_empty = input_only.w.size() == p.w.size();
  for (const Tensor& t : input_only.w) all_empty &= shape_of(t) == std::vector<int64_t>{0};
  check(all_empty, L + ": weight grads not empty [0] with need_weight_grad=false");
  check_close(L + ": grad_input (input only)", input_only.input, p.in_shape(), g.input, 1e-11,
              1e-11);

  const OpGrads none = op_backward(p, f, false, false);
  check(shape_of(none.input) == std::vector<int64_t>{0}, L + ": grad_input not empty (none)");
  check_close(L + ": grad_hx (nothing else needed)", none.hx, p.state_shape(), g.hx, 1e-11, 1e-11);
}

void test_float32(const Problem& p) {
  const std::string L = label(p) + " float32";
  const RefForward ref = naive_forward(p, {});
  const OpForward f = op_forward(p, ScalarType::Float);
  check(f.out.scalar_type() == ScalarType::Float, L + ": output dtype is not float32");
  check_close(L + ": forward output", f.out, p.out_shape(), ref.layer_out.back(), 1e-5, 1e-5);
  check_close(L + ": forward h_n", f.h_n, p.state_shape(), ref.h_n, 1e-5, 1e-5);
}

// A bad argument is reported as an error carrying the check's message, not a crash.
void expect_error(const std::string& what, const std::string& message,
                  std::vector<StableIValue> stack) {
  std::printf("expecting an error from fastrnn::rnn (%s):\n", what.c_str());
  std::fflush(stdout);
  bool threw = false;
  try {
    call("fastrnn::rnn", stack);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\n");  // torch logs the error without a newline
    threw = std::string(e.what()).find(message) != std::string::npos;
    if (!threw) std::printf("unexpected error message: %s\n", e.what());
  }
  check(threw, "fastrnn::rnn with " + what + " did not fail with \"" + message + "\"");
}

void test_errors(Problem p) {
  // hx with one row too many
  p.hx.resize(p.cells() * (p.B + 1) * p.H, 0.0);
  expect_error("a wrong hx shape", "fastrnn::rnn: hx must have shape",
               rnn_args(p, ScalarType::Double, weight_tensors(p, ScalarType::Double),
                        p.nonlinearity(), {p.cells(), p.B + 1, p.H}));
  p.hx.resize(p.cells() * p.B * p.H);
  expect_error("an unknown nonlinearity", "fastrnn::rnn: unknown nonlinearity 'gelu'",
               rnn_args(p, ScalarType::Double, weight_tensors(p, ScalarType::Double), "gelu",
                        p.state_shape()));
  std::vector<Tensor> short_weights = weight_tensors(p, ScalarType::Double);
  short_weights.pop_back();
  expect_error("a weight missing", "weights (",
               rnn_args(p, ScalarType::Double, short_weights, p.nonlinearity(), p.state_shape()));
}

}  // namespace

int main() {
  try {
    std::printf("fastrnn C++ test, libtorch ABI version %llx, target %llx\n",
                static_cast<unsigned long long>(aoti_torch_abi_version()),
                static_cast<unsigned long long>(TORCH_TARGET_VERSION));
    const int64_t B = 3, I = 4, H = 5;
    const std::vector<int64_t> padded(6, B);              // T = 6
    const std::vector<int64_t> packed{3, 3, 2, 2, 1, 1};  // lengths 6, 4, 2
    uint64_t seed = 1;
    //                       name           L  D  B  I  H  batch_sizes packed relu   bias
    const Problem one = make_problem("one layer", 1, 1, B, I, H, padded, false, false, true, seed++);
    const Problem packed_2x2 =
        make_problem("2 layers bidirectional", 2, 2, B, I, H, packed, true, true, true, seed++);
    const Problem padded_2x2 =
        make_problem("2 layers bidirectional", 2, 2, B, I, H, padded, false, false, false, seed++);
    const Problem packed_3 =
        make_problem("3 layers", 3, 1, B, I, H, packed, true, false, true, seed++);
    const Problem one_step =
        make_problem("one step", 2, 2, 2, 3, 4, {2}, false, true, true, seed++);
    const Problem dropout = make_problem("dropout", 3, 2, B, I, H, packed, true, false, true,
                                         seed++, /*dropout=*/0.5, /*train=*/true);
    const Problem dropout_1 = make_problem("dropout 1", 2, 1, B, I, H, padded, false, true, true,
                                           seed++, 1.0, true);
    const Problem not_training = make_problem("dropout, not training", 2, 2, B, I, H, packed,
                                              true, false, true, seed++, 0.5, false);

    for (const Problem& p : {one, packed_2x2, padded_2x2, packed_3, one_step, dropout_1,
                             not_training}) {
      test_problem(p, /*with_finite_differences=*/true);
    }
    // Random masks: against the naive loops with the masks read back from the reserve.
    test_problem(dropout, false);
    test_partial_grads(packed_2x2);
    test_partial_grads(dropout);
    test_float32(one);
    test_float32(packed_2x2);
    test_errors(packed_2x2);
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 2;
  }
  if (g_failures) {
    std::printf("%d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  std::printf("all %d checks passed\n", g_checks);
  return 0;
}
