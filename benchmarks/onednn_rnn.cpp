// oneDNN's vanilla RNN primitive as a benchmark contender for cpu_shapes.py (optional; not a
// dependency of fastrnn). One stack of Elman layers, time major, f32, unidirectional; weights
// reordered once into the primitives' preferred layouts (as a framework would cache them), so
// a run times only the primitives (and, in training, zeroing the weight gradients, which
// oneDNN accumulates into).
//
// Build against a oneDNN 3.x (e.g. the onednn-devel-cpu-gomp + onednn-cpu-gomp wheels,
// unpacked) and load it into the benchmark process after torch, so that both share torch's
// libgomp:
//   g++ -O2 -shared -fPIC -std=c++17 benchmarks/onednn_rnn.cpp -I$DNNL/include \
//       -L$DNNL/lib -ldnnl -Wl,-rpath,$DNNL/lib -o /tmp/libonednn_rnn.so
//   python benchmarks/cpu_shapes.py --onednn /tmp/libonednn_rnn.so
#include <dnnl.hpp>

#include <cstring>
#include <memory>
#include <vector>

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

struct Layer {
  memory src_layer, src_iter, weights_layer, weights_iter, bias, dst_layer, dst_iter, workspace;
  vanilla_rnn_forward fwd;
  // training only
  memory bwd_weights_layer, bwd_weights_iter, diff_src_layer, diff_src_iter, diff_weights_layer,
      diff_weights_iter, diff_bias, diff_dst_layer, diff_dst_iter;
  vanilla_rnn_backward bwd;
};

memory filled(const memory::desc& md, const engine& eng, float scale) {
  memory m(md, eng);
  float* p = static_cast<float*>(m.get_data_handle());
  const size_t n = md.get_size() / sizeof(float);
  for (size_t i = 0; i < n; ++i) p[i] = scale * (float((i * 2654435761u) % 1000) / 500.f - 1.f);
  return m;
}

// A tensor in the primitive's layout `want`, filled from a plain one.
memory reordered(const memory::desc& plain, const memory::desc& want, const engine& eng,
                 stream& s, float scale) {
  memory src = filled(plain, eng, scale);
  if (plain == want) return src;
  memory dst(want, eng);
  reorder(src, dst).execute(s, src, dst);
  return dst;
}

struct Net {
  engine eng{engine::kind::cpu, 0};
  stream s{eng};
  std::vector<Layer> layers;
  bool training;
};

}  // namespace

extern "C" void* onednn_rnn_create(int T, int N, int I, int H, int L, int relu, int training) {
  auto net = std::make_unique<Net>();
  net->training = training;
  const auto alg = relu ? algorithm::eltwise_relu : algorithm::eltwise_tanh;
  const auto dir = rnn_direction::unidirectional_left2right;
  const auto prop = training ? prop_kind::forward_training : prop_kind::forward_inference;
  engine& eng = net->eng;
  for (int l = 0; l < L; ++l) {
    const memory::dim in = l == 0 ? I : H;
    memory::desc src_layer_md({T, N, in}, dt::f32, tag::tnc);
    memory::desc iter_md({1, 1, N, H}, dt::f32, tag::ldnc);
    memory::desc wl_plain({1, 1, in, 1, H}, dt::f32, tag::ldigo);
    memory::desc wi_plain({1, 1, H, 1, H}, dt::f32, tag::ldigo);
    memory::desc wl_any({1, 1, in, 1, H}, dt::f32, tag::any);
    memory::desc wi_any({1, 1, H, 1, H}, dt::f32, tag::any);
    memory::desc bias_md({1, 1, 1, H}, dt::f32, tag::ldgo);
    memory::desc dst_layer_md({T, N, H}, dt::f32, tag::tnc);
    auto fpd = vanilla_rnn_forward::primitive_desc(eng, prop, alg, dir, src_layer_md, iter_md,
                                                   wl_any, wi_any, bias_md, dst_layer_md, iter_md);
    Layer ly;
    ly.src_layer = l == 0 ? filled(src_layer_md, eng, 1.f) : net->layers.back().dst_layer;
    ly.src_iter = filled(iter_md, eng, 0.f);
    ly.weights_layer = reordered(wl_plain, fpd.weights_layer_desc(), eng, net->s, 0.1f);
    ly.weights_iter = reordered(wi_plain, fpd.weights_iter_desc(), eng, net->s, 0.05f);
    ly.bias = filled(bias_md, eng, 0.1f);
    ly.dst_layer = memory(dst_layer_md, eng);
    ly.dst_iter = memory(iter_md, eng);
    if (training) ly.workspace = memory(fpd.workspace_desc(), eng);
    ly.fwd = vanilla_rnn_forward(fpd);
    if (training) {
      auto bpd = vanilla_rnn_backward::primitive_desc(
          eng, prop_kind::backward, alg, dir, src_layer_md, iter_md, wl_any, wi_any, bias_md,
          dst_layer_md, iter_md, src_layer_md, iter_md, wl_any, wi_any, bias_md, dst_layer_md,
          iter_md, fpd);
      ly.bwd_weights_layer = reordered(wl_plain, bpd.weights_layer_desc(), eng, net->s, 0.1f);
      ly.bwd_weights_iter = reordered(wi_plain, bpd.weights_iter_desc(), eng, net->s, 0.05f);
      ly.diff_src_layer = memory(bpd.diff_src_layer_desc(), eng);
      ly.diff_src_iter = memory(bpd.diff_src_iter_desc(), eng);
      ly.diff_weights_layer = memory(bpd.diff_weights_layer_desc(), eng);
      ly.diff_weights_iter = memory(bpd.diff_weights_iter_desc(), eng);
      ly.diff_bias = memory(bpd.diff_bias_desc(), eng);
      ly.diff_dst_layer = filled(bpd.diff_dst_layer_desc(), eng, 1.f);
      ly.diff_dst_iter = filled(bpd.diff_dst_iter_desc(), eng, 1.f);
      ly.bwd = vanilla_rnn_backward(bpd);
    }
    net->layers.push_back(std::move(ly));
  }
  net->s.wait();
  return net.release();
}

extern "C" void onednn_rnn_run(void* handle) {
  Net& net = *static_cast<Net*>(handle);
  for (Layer& ly : net.layers) {
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC_LAYER, ly.src_layer}, {DNNL_ARG_SRC_ITER, ly.src_iter},
        {DNNL_ARG_WEIGHTS_LAYER, ly.weights_layer}, {DNNL_ARG_WEIGHTS_ITER, ly.weights_iter},
        {DNNL_ARG_BIAS, ly.bias}, {DNNL_ARG_DST_LAYER, ly.dst_layer},
        {DNNL_ARG_DST_ITER, ly.dst_iter}};
    if (net.training) args[DNNL_ARG_WORKSPACE] = ly.workspace;
    ly.fwd.execute(net.s, args);
  }
  if (net.training) {
    for (auto it = net.layers.rbegin(); it != net.layers.rend(); ++it) {
      Layer& ly = *it;
      for (memory* m : {&ly.diff_weights_layer, &ly.diff_weights_iter, &ly.diff_bias}) {
        std::memset(m->get_data_handle(), 0, m->get_desc().get_size());
      }
      ly.bwd.execute(net.s, {{DNNL_ARG_SRC_LAYER, ly.src_layer},
                             {DNNL_ARG_SRC_ITER, ly.src_iter},
                             {DNNL_ARG_WEIGHTS_LAYER, ly.bwd_weights_layer},
                             {DNNL_ARG_WEIGHTS_ITER, ly.bwd_weights_iter},
                             {DNNL_ARG_BIAS, ly.bias},
                             {DNNL_ARG_DST_LAYER, ly.dst_layer},
                             {DNNL_ARG_DST_ITER, ly.dst_iter},
                             {DNNL_ARG_WORKSPACE, ly.workspace},
                             {DNNL_ARG_DIFF_SRC_LAYER, ly.diff_src_layer},
                             {DNNL_ARG_DIFF_SRC_ITER, ly.diff_src_iter},
                             {DNNL_ARG_DIFF_WEIGHTS_LAYER, ly.diff_weights_layer},
                             {DNNL_ARG_DIFF_WEIGHTS_ITER, ly.diff_weights_iter},
                             {DNNL_ARG_DIFF_BIAS, ly.diff_bias},
                             {DNNL_ARG_DIFF_DST_LAYER, ly.diff_dst_layer},
                             {DNNL_ARG_DIFF_DST_ITER, ly.diff_dst_iter}});
    }
  }
  net.s.wait();
}

extern "C" void onednn_rnn_destroy(void* handle) { delete static_cast<Net*>(handle); }
