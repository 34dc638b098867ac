// C++ test of fastrnn's CPU kernels, called through torch's dispatcher exactly
// as a C++ user of libfastrnn would (no Python involved).
//
// For tanh/relu x forward/reverse x padded/packed x bias variants it checks
//   * elman_forward (output, h_n) against a naive per-sequence loop,
//   * elman_backward (all five gradients) against a naive backprop loop,
//   * elman_backward against central finite differences of elman_forward
//     (so the op's forward and backward agree with each other, independently
//     of the naive reference),
// plus need_*_grad=false, a float32 run and an argument error.
// Exit status 0 on success; every mismatch is printed.
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
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
  Tensor t = torch::stable::empty({static_cast<int64_t>(values.size())},
                                  ScalarType::Long);
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
void check_close(const std::string& what, const Tensor& got,
                 const std::vector<int64_t>& want_shape, const Vec& want,
                 double atol, double rtol) {
  ++g_checks;
  if (shape_of(got) != want_shape) {
    fail(what + ": shape " + shape_str(shape_of(got)) + ", expected " +
         shape_str(want_shape));
    return;
  }
  const Vec g = values_of(got);
  int64_t worst = -1;
  double worst_excess = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(g[i] - want[i]);
    const double excess = err - (atol + rtol * std::abs(want[i]));
    if (!(excess <= 0.0) && (worst < 0 || !(excess <= worst_excess))) {
      worst = static_cast<int64_t>(i);
      worst_excess = excess;
    }
  }
  if (worst >= 0) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  ": element %lld got %.17g, expected %.17g (|diff| %.3g)",
                  static_cast<long long>(worst), g[worst], want[worst],
                  std::abs(g[worst] - want[worst]));
    fail(what + buf);
  }
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

enum class Bias { Both, IhOnly, None };

struct Problem {
  std::string name;
  int64_t T = 0, B = 0, I = 0, H = 0;
  bool packed = false;
  std::vector<int64_t> batch_sizes;  // [T]; all B when padded
  std::vector<int64_t> offsets;      // [T], first row of each step
  int64_t N = 0;                     // rows
  bool relu = false, reverse = false;
  Bias bias = Bias::Both;
  Vec x, hx, w_ih, w_hh, b_ih, b_hh;  // b_* empty when absent
  Vec gy, gh_n;                       // upstream gradients for backward
  int64_t hx_rows = -1;               // rows of the hx passed to the op (B if < 0)

  std::vector<int64_t> in_shape() const {
    return packed ? std::vector<int64_t>{N, I} : std::vector<int64_t>{T, B, I};
  }
  std::vector<int64_t> out_shape() const {
    return packed ? std::vector<int64_t>{N, H} : std::vector<int64_t>{T, B, H};
  }
  // Steps of sequence b in the order the recurrence visits them.
  std::vector<int64_t> order(int64_t b) const {
    std::vector<int64_t> ts;
    for (int64_t t = 0; t < T; ++t) {
      if (batch_sizes[t] > b) ts.push_back(t);
    }
    if (reverse) std::reverse(ts.begin(), ts.end());
    return ts;
  }
  int64_t row(int64_t t, int64_t b) const { return offsets[t] + b; }
};

Problem make_problem(std::string name, int64_t B, int64_t I, int64_t H,
                     std::vector<int64_t> batch_sizes, bool packed, bool relu,
                     bool reverse, Bias bias, uint64_t seed) {
  Problem p;
  p.name = std::move(name);
  p.T = static_cast<int64_t>(batch_sizes.size());
  p.B = B;
  p.I = I;
  p.H = H;
  p.packed = packed;
  p.batch_sizes = std::move(batch_sizes);
  p.offsets.resize(p.T);
  for (int64_t t = 0; t < p.T; ++t) {
    p.offsets[t] = p.N;
    p.N += p.batch_sizes[t];
  }
  p.relu = relu;
  p.reverse = reverse;
  p.bias = bias;
  Lcg rng{seed};
  p.x = rng.fill(p.N * I, 1.0);
  p.hx = rng.fill(B * H, 0.8);
  p.w_ih = rng.fill(H * I, 0.6);
  p.w_hh = rng.fill(H * H, 0.5);
  if (bias != Bias::None) p.b_ih = rng.fill(H, 0.3);
  if (bias == Bias::Both) p.b_hh = rng.fill(H, 0.3);
  p.gy = rng.fill(p.N * H, 1.0);
  p.gh_n = rng.fill(B * H, 1.0);
  return p;
}

std::string label(const Problem& p) {
  return p.name + (p.packed ? " packed" : " padded") + (p.relu ? " relu" : " tanh") +
         (p.reverse ? " reverse" : " forward") +
         (p.bias == Bias::Both ? " bias" : p.bias == Bias::IhOnly ? " bias_ih-only" : " no-bias");
}

// ---------------------------------------------------------------- reference

struct RefForward {
  Vec out, h_n;
};

RefForward naive_forward(const Problem& p) {
  RefForward r{Vec(p.N * p.H), Vec(p.B * p.H)};
  for (int64_t b = 0; b < p.B; ++b) {
    Vec h(p.hx.begin() + b * p.H, p.hx.begin() + (b + 1) * p.H);
    for (int64_t t : p.order(b)) {
      const int64_t row = p.row(t, b);
      Vec h_new(p.H);
      for (int64_t k = 0; k < p.H; ++k) {
        double a = 0.0;
        for (int64_t i = 0; i < p.I; ++i) a += p.x[row * p.I + i] * p.w_ih[k * p.I + i];
        if (!p.b_ih.empty()) a += p.b_ih[k];
        if (!p.b_hh.empty()) a += p.b_hh[k];
        for (int64_t j = 0; j < p.H; ++j) a += h[j] * p.w_hh[k * p.H + j];
        h_new[k] = p.relu ? std::max(a, 0.0) : std::tanh(a);
      }
      h = h_new;
      std::copy(h.begin(), h.end(), r.out.begin() + row * p.H);
    }
    std::copy(h.begin(), h.end(), r.h_n.begin() + b * p.H);
  }
  return r;
}

struct RefGrads {
  Vec input, hx, w_ih, w_hh, bias;
};

RefGrads naive_backward(const Problem& p, const Vec& out) {
  RefGrads g{Vec(p.N * p.I), Vec(p.B * p.H), Vec(p.H * p.I), Vec(p.H * p.H),
             Vec(p.H)};
  for (int64_t b = 0; b < p.B; ++b) {
    const std::vector<int64_t> ts = p.order(b);
    Vec dh(p.gh_n.begin() + b * p.H, p.gh_n.begin() + (b + 1) * p.H);
    for (int64_t s = static_cast<int64_t>(ts.size()) - 1; s >= 0; --s) {
      const int64_t row = p.row(ts[s], b);
      const double* h = &out[row * p.H];
      const double* h_prev = s > 0 ? &out[p.row(ts[s - 1], b) * p.H] : &p.hx[b * p.H];
      Vec dA(p.H);
      for (int64_t k = 0; k < p.H; ++k) {
        const double d = p.relu ? (h[k] > 0.0 ? 1.0 : 0.0) : 1.0 - h[k] * h[k];
        dA[k] = (p.gy[row * p.H + k] + dh[k]) * d;
      }
      for (int64_t k = 0; k < p.H; ++k) {
        for (int64_t i = 0; i < p.I; ++i) {
          g.input[row * p.I + i] += dA[k] * p.w_ih[k * p.I + i];
          g.w_ih[k * p.I + i] += dA[k] * p.x[row * p.I + i];
        }
        for (int64_t j = 0; j < p.H; ++j) g.w_hh[k * p.H + j] += dA[k] * h_prev[j];
        g.bias[k] += dA[k];
      }
      for (int64_t j = 0; j < p.H; ++j) {
        double a = 0.0;
        for (int64_t k = 0; k < p.H; ++k) a += dA[k] * p.w_hh[k * p.H + j];
        dh[j] = a;
      }
    }
    std::copy(dh.begin(), dh.end(), g.hx.begin() + b * p.H);
  }
  return g;
}

// ---------------------------------------------------------------- the ops

struct OpForward {
  Tensor out, h_n;
};

std::optional<Tensor> opt(const Vec& v, int64_t n, ScalarType dtype) {
  if (v.empty()) return std::nullopt;
  return make_tensor({n}, v, dtype);
}

OpForward op_forward(const Problem& p, ScalarType dtype = ScalarType::Double) {
  std::optional<Tensor> batch_sizes;
  if (p.packed) batch_sizes = make_long(p.batch_sizes);
  std::array<StableIValue, 9> stack{
      torch::stable::detail::from(make_tensor(p.in_shape(), p.x, dtype)),
      torch::stable::detail::from(
          make_tensor({p.hx_rows < 0 ? p.B : p.hx_rows, p.H}, p.hx, dtype)),
      torch::stable::detail::from(make_tensor({p.H, p.I}, p.w_ih, dtype)),
      torch::stable::detail::from(make_tensor({p.H, p.H}, p.w_hh, dtype)),
      torch::stable::detail::from(opt(p.b_ih, p.H, dtype)),
      torch::stable::detail::from(opt(p.b_hh, p.H, dtype)),
      torch::stable::detail::from(batch_sizes),
      torch::stable::detail::from(p.relu),
      torch::stable::detail::from(p.reverse)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(
      "fastrnn::elman_forward", "", stack.data(), TORCH_ABI_VERSION));
  return {torch::stable::detail::to<Tensor>(stack[0]),
          torch::stable::detail::to<Tensor>(stack[1])};
}

struct OpGrads {
  Tensor input, hx, w_ih, w_hh, bias;
};

OpGrads op_backward(const Problem& p, const Tensor& out, bool need_input = true,
                    bool need_weight = true, bool need_bias = true) {
  std::optional<Tensor> batch_sizes;
  if (p.packed) batch_sizes = make_long(p.batch_sizes);
  std::array<StableIValue, 13> stack{
      torch::stable::detail::from(make_tensor(p.out_shape(), p.gy)),
      torch::stable::detail::from(make_tensor({p.B, p.H}, p.gh_n)),
      torch::stable::detail::from(make_tensor(p.in_shape(), p.x)),
      torch::stable::detail::from(make_tensor({p.B, p.H}, p.hx)),
      torch::stable::detail::from(make_tensor({p.H, p.I}, p.w_ih)),
      torch::stable::detail::from(make_tensor({p.H, p.H}, p.w_hh)),
      torch::stable::detail::from(out),
      torch::stable::detail::from(batch_sizes),
      torch::stable::detail::from(p.relu),
      torch::stable::detail::from(p.reverse),
      torch::stable::detail::from(need_input),
      torch::stable::detail::from(need_weight),
      torch::stable::detail::from(need_bias)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(
      "fastrnn::elman_backward", "", stack.data(), TORCH_ABI_VERSION));
  return {torch::stable::detail::to<Tensor>(stack[0]),
          torch::stable::detail::to<Tensor>(stack[1]),
          torch::stable::detail::to<Tensor>(stack[2]),
          torch::stable::detail::to<Tensor>(stack[3]),
          torch::stable::detail::to<Tensor>(stack[4])};
}

// sum(gy * output) + sum(gh_n * h_n) of the op's forward: the scalar whose
// gradient elman_backward computes.
double op_loss(const Problem& p) {
  const OpForward f = op_forward(p);
  const Vec out = values_of(f.out), h_n = values_of(f.h_n);
  double l = 0.0;
  for (size_t i = 0; i < out.size(); ++i) l += p.gy[i] * out[i];
  for (size_t i = 0; i < h_n.size(); ++i) l += p.gh_n[i] * h_n[i];
  return l;
}

// Central differences of op_loss with respect to every element of *param.
Vec finite_differences(Problem p, Vec Problem::*param) {
  constexpr double eps = 1e-6;
  Vec& v = p.*param;
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

void test_problem(const Problem& p) {
  const std::string L = label(p);
  const RefForward ref = naive_forward(p);
  const OpForward f = op_forward(p);
  check_close(L + ": forward output", f.out, p.out_shape(), ref.out, 1e-12, 1e-12);
  check_close(L + ": forward h_n", f.h_n, {p.B, p.H}, ref.h_n, 1e-12, 1e-12);

  // Backward from the op's own output (what autograd would save).
  const RefGrads g = naive_backward(p, values_of(f.out));
  const OpGrads og = op_backward(p, f.out);
  check_close(L + ": grad_input", og.input, p.in_shape(), g.input, 1e-11, 1e-11);
  check_close(L + ": grad_hx", og.hx, {p.B, p.H}, g.hx, 1e-11, 1e-11);
  check_close(L + ": grad_weight_ih", og.w_ih, {p.H, p.I}, g.w_ih, 1e-11, 1e-11);
  check_close(L + ": grad_weight_hh", og.w_hh, {p.H, p.H}, g.w_hh, 1e-11, 1e-11);
  check_close(L + ": grad_bias", og.bias, {p.H}, g.bias, 1e-11, 1e-11);

  // The op's backward is the gradient of the op's forward.
  constexpr double fd_tol = 1e-6;
  check_close(L + ": grad_input vs finite differences", og.input, p.in_shape(),
              finite_differences(p, &Problem::x), fd_tol, fd_tol);
  check_close(L + ": grad_hx vs finite differences", og.hx, {p.B, p.H},
              finite_differences(p, &Problem::hx), fd_tol, fd_tol);
  check_close(L + ": grad_weight_ih vs finite differences", og.w_ih, {p.H, p.I},
              finite_differences(p, &Problem::w_ih), fd_tol, fd_tol);
  check_close(L + ": grad_weight_hh vs finite differences", og.w_hh, {p.H, p.H},
              finite_differences(p, &Problem::w_hh), fd_tol, fd_tol);
  if (!p.b_ih.empty()) {
    check_close(L + ": grad_bias vs finite differences (bias_ih)", og.bias, {p.H},
                finite_differences(p, &Problem::b_ih), fd_tol, fd_tol);
  }
  if (!p.b_hh.empty()) {
    check_close(L + ": grad_bias vs finite differences (bias_hh)", og.bias, {p.H},
                finite_differences(p, &Problem::b_hh), fd_tol, fd_tol);
  }
}

// Gradients that are not asked for come back as empty [0] tensors; the rest
// are unaffected.
void test_partial_grads(const Problem& p) {
  const std::string L = label(p) + " partial";
  const OpForward f = op_forward(p);
  const RefGrads g = naive_backward(p, values_of(f.out));
  const OpGrads og = op_backward(p, f.out, /*input=*/false, /*weight=*/true,
                                 /*bias=*/false);
  check(shape_of(og.input) == std::vector<int64_t>{0}, L + ": grad_input not empty [0]");
  check(shape_of(og.bias) == std::vector<int64_t>{0}, L + ": grad_bias not empty [0]");
  check_close(L + ": grad_hx", og.hx, {p.B, p.H}, g.hx, 1e-11, 1e-11);
  check_close(L + ": grad_weight_hh", og.w_hh, {p.H, p.H}, g.w_hh, 1e-11, 1e-11);

  const OpGrads none = op_backward(p, f.out, false, false, false);
  check(shape_of(none.w_ih) == std::vector<int64_t>{0} &&
            shape_of(none.w_hh) == std::vector<int64_t>{0},
        L + ": weight grads not empty [0] with need_weight_grad=false");
  check_close(L + ": grad_hx (nothing else needed)", none.hx, {p.B, p.H}, g.hx,
              1e-11, 1e-11);
}

void test_float32(const Problem& p) {
  const std::string L = label(p) + " float32";
  const RefForward ref = naive_forward(p);
  const OpForward f = op_forward(p, ScalarType::Float);
  check(f.out.scalar_type() == ScalarType::Float, L + ": output dtype is not float32");
  check_close(L + ": forward output", f.out, p.out_shape(), ref.out, 1e-5, 1e-5);
  check_close(L + ": forward h_n", f.h_n, {p.B, p.H}, ref.h_n, 1e-5, 1e-5);
}

// A bad argument is reported as an error code, not a crash.
void test_error(Problem p) {
  p.hx_rows = p.B + 1;  // hx has one row too many
  p.hx.resize(p.hx_rows * p.H, 0.0);
  std::printf("expecting an hx shape error from elman_forward:\n");
  std::fflush(stdout);
  bool threw = false;
  try {
    (void)op_forward(p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\n");  // torch logs the error without a newline
    threw = std::string(e.what()).find("hx must have shape") != std::string::npos;
    if (!threw) std::printf("unexpected error message: %s\n", e.what());
  }
  check(threw, "elman_forward with a wrong hx shape did not fail with a shape error");
}

}  // namespace

int main() {
  try {
    std::printf("fastrnn C++ test, libtorch ABI version %llx, target %llx\n",
                static_cast<unsigned long long>(aoti_torch_abi_version()),
                static_cast<unsigned long long>(TORCH_TARGET_VERSION));
    const int64_t B = 3, I = 4, H = 5;
    const std::vector<int64_t> padded(6, B);               // T = 6
    const std::vector<int64_t> packed{3, 3, 2, 2, 1, 1};   // lengths 6, 4, 2
    uint64_t seed = 1;
    std::vector<Problem> problems;
    for (bool relu : {false, true}) {
      for (bool reverse : {false, true}) {
        problems.push_back(make_problem("case", B, I, H, padded, false, relu,
                                        reverse, Bias::Both, seed++));
        problems.push_back(make_problem("case", B, I, H, packed, true, relu,
                                        reverse, Bias::Both, seed++));
      }
    }
    problems.push_back(make_problem("case", B, I, H, padded, false, false, false,
                                    Bias::IhOnly, seed++));
    problems.push_back(make_problem("case", B, I, H, packed, true, true, true,
                                    Bias::None, seed++));
    // A single step: h_{t-1} is hx for every row.
    problems.push_back(make_problem("one-step", 2, 3, 4, {2}, false, false, true,
                                    Bias::Both, seed++));

    for (const Problem& p : problems) test_problem(p);
    test_partial_grads(problems[1]);
    test_partial_grads(problems[2]);
    test_float32(problems[0]);
    test_float32(problems[3]);
    test_error(problems[0]);
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
