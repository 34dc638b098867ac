// fastrnn CUDA kernels: the stack driver (stack.h) with cuBLAS GEMMs through
// torch's CUDA shims, on the current stream. The recurrences run in the
// persistent kernels of persistent.cuh where W_hh (or its slices, over a
// cluster's CTAs on sm_90) fits in shared memory, else with one GEMM and one
// pointwise kernel per step (stepwise.h); a layer's two directions run at
// once, the second on a side stream.
#include "../stack.h"
#include "../stepwise.h"
#include "persistent.cuh"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace fastrnn {
namespace {

// f(b, j) for every element of a rows x cols step (cells.h functors).
template <typename F>
__global__ void for_each_kernel(F f, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    f(i / cols, i % cols);
  }
}

// Column sums of t [n, cols] (row stride ld), by chunks of kSumRows rows: block
// (32, 8) of grid (x, y) sums columns [32x, 32x + 32) of chunk y, warp w its rows
// w, w + 8, ..., and adds the warps' sums in order; into out where the chunk is
// the only one, else into partial [chunks, cols]. The order depends on n alone:
// the same bits on every run and every GPU.
constexpr int kSumRows = 256;

template <typename T, typename acc_t>
__global__ void column_sum_kernel(const T* t, int64_t ld, int64_t n, int64_t cols, acc_t* partial, T* out) {
  __shared__ acc_t sums[8][32];
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  const int64_t chunk_end = (blockIdx.y + 1) * static_cast<int64_t>(kSumRows), end = chunk_end < n ? chunk_end : n;
  acc_t s = 0;
  if (col < cols) {
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kSumRows) + threadIdx.y; r < end; r += 8) {
      s += load<acc_t>(t[r * ld + col]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  for (int w = 1; w < 8; ++w) s += sums[w][threadIdx.x];
  if (out) {
    out[col] = store<T>(s);
  } else {
    partial[blockIdx.y * cols + col] = s;
  }
}

// out[c] = the sum of partial [chunks, cols]'s column c, in chunk order.
template <typename T, typename acc_t>
__global__ void column_sum_chunks_kernel(const acc_t* partial, int64_t chunks, int64_t cols, T* out) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  acc_t s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * cols + col];
  out[col] = store<T>(s);
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

void cuda_check(cudaError_t err, const char* what) {
  FASTRNN_CHECK(err == cudaSuccess, "fastrnn: ", what, " failed: ", cudaGetErrorString(err));
}

void check_launch(const char* what) { cuda_check(cudaGetLastError(), what); }

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  cuda_check(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

// The persistent kernels run wherever W_hh fits on chip; FASTRNN_CUDA_PERSISTENT=0
// sends every layer to the per-step path (a cuBLAS GEMM per step), for comparison.
bool persistent_enabled() {
  const char* flag = std::getenv("FASTRNN_CUDA_PERSISTENT");
  return flag == nullptr || std::strcmp(flag, "0") != 0;
}

// persistent::plan for this device, for one of `concurrent` layers that run at
// once (a layer's directions, concurrently()): each is planned on its share of the SMs.
// sms: the SMs to plan on, where not the device's share (SMs / concurrent).
bool plan_cluster(const SequenceLayout& L, int64_t H, int G, int device, int concurrent,
                  persistent::SmemBytes smem, persistent::Plan& plan, int64_t sms = 0) {
  const persistent::Device d{
      device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9 ? persistent::kMaxCluster : 1,
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
      sms > 0 ? sms
              : std::max(1, device_attribute(cudaDevAttrMultiProcessorCount, device) / std::max(1, concurrent))};
  plan = persistent::plan(L.batch, H, G, d, smem);
  return plan.size > 0;
}

// Per-device caches below cover devices [0, kMaxDevices).
constexpr int kMaxDevices = 64;

// bound = max(bound, v).
void raise_to(std::atomic<size_t>& bound, size_t v) {
  size_t seen = bound.load(std::memory_order_relaxed);
  while (seen < v && !bound.compare_exchange_weak(seen, v)) {
  }
}

// Lets `kernel` take `smem` bytes of dynamic shared memory on `device`. The
// attribute stays set for the process, so it is set only when a launch needs
// more than any before it (one driver call per kernel and device, not one per
// launch). A race sets it twice, harmlessly.
template <auto kernel>
void prepare(size_t smem, int device) {
  static std::atomic<size_t> allowed[kMaxDevices] = {};  // per kernel: one per instantiation
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && smem <= allowed[device].load(std::memory_order_relaxed)) return;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute");
  if (cached) raise_to(allowed[device], smem);
}

// Lets `kernel` launch clusters of more than 8 CTAs (a non-portable size) on
// `device`, once per kernel and device; false where the device refuses.
template <auto kernel>
bool allow_large_clusters(int device) {
  static std::atomic<int> known[kMaxDevices] = {};  // per kernel: 0 not asked, 1 allowed, 2 refused
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && known[device].load(std::memory_order_relaxed) != 0) return known[device] == 1;
  const bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();  // not a launch error: smaller clusters or GEMMs instead
  if (cached) known[device] = ok ? 1 : 2;
  return ok;
}

// f.template operator()<T>() for the dtype's storage type.
template <typename F>
void with_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float: return f.template operator()<float>();
    case ScalarType::Double: return f.template operator()<double>();
    case ScalarType::Half: return f.template operator()<__half>();
    case ScalarType::BFloat16: return f.template operator()<__nv_bfloat16>();
    default: fail("fastrnn: unsupported dtype on CUDA");
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

struct CudaBackend;

// A persistent.cuh kernel's launch by plan, once the device is known to hold
// one such cluster (capacity()).
template <auto kernel>
class ClusterLaunch {
 public:
  ClusterLaunch(const persistent::Plan& plan, int device, cudaStream_t stream)
      : device_(device), size_index_(std::countr_zero(static_cast<unsigned>(plan.size))) {
    prepare<kernel>(plan.smem, device);
    allowed_ = plan.size <= 8 || allow_large_clusters<kernel>(device);
    config_.gridDim = dim3(static_cast<unsigned>(plan.clusters * plan.size));
    config_.blockDim = dim3(persistent::kThreads);
    config_.dynamicSmemBytes = plan.smem;
    config_.stream = stream;
    attribute_.id = cudaLaunchAttributeClusterDimension;
    attribute_.val.clusterDim.x = static_cast<unsigned>(plan.size);
    attribute_.val.clusterDim.y = 1;
    attribute_.val.clusterDim.z = 1;
    config_.attrs = &attribute_;
    config_.numAttrs = plan.size > 1 ? 1 : 0;  // one CTA: a plain launch, any device
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config_ points into it

  // How many such clusters the device holds at once (0: none), from the
  // occupancy query, asked once per kernel, device, cluster size and shared
  // memory. Clusters of 2 or more CTAs hold fewer than SMs / size where the
  // SMs of a GPC do not divide by it.
  int capacity() const {
    static std::mutex mutex;  // per kernel: one per instantiation
    static std::map<std::tuple<int, int, size_t>, int> known;
    if (!allowed_) return 0;
    const auto key = std::make_tuple(device_, size_index_, config_.dynamicSmemBytes);
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = known.find(key); it != known.end()) return it->second;
    int fit = 0;
    const cudaError_t err =
        config_.numAttrs ? cudaOccupancyMaxActiveClusters(&fit, kernel, &config_)
                         : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, persistent::kThreads,
                                                                        config_.dynamicSmemBytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // not a launch error: the caller steps with GEMMs instead
      fit = 0;
    } else if (!config_.numAttrs) {
      fit *= device_attribute(cudaDevAttrMultiProcessorCount, device_);
    }
    known.emplace(key, fit);
    return fit;
  }

  template <typename... Args>
  void operator()(Args... args) const {
    cuda_check(cudaLaunchKernelEx(&config_, kernel, args...), "persistent kernel launch");
  }

 private:
  int device_;
  int size_index_;  // log2 of the cluster size
  bool allowed_;    // the device launches clusters of this size
  cudaLaunchConfig_t config_ = {};
  cudaLaunchAttribute attribute_ = {};
};

// A layer's recurrence in a persistent.cuh kernel: planned (plan_cluster), and
// run where the device holds such a cluster and a packed sequence's batch sizes
// fit the kernel's parameters (persistent::Runs), after before() (what the
// kernel reads first, put in place only once it runs); then run(launch, plan,
// runs) passes the job's arguments. False: nothing done.
template <auto kernel, typename Before, typename Run>
bool run_cluster(const SequenceLayout& L, int64_t H, int G, const Tensor& like, int concurrent,
                 persistent::SmemBytes smem, const Before& before, const Run& run) {
  persistent::Runs runs{};
  if (L.packed && !persistent::make_runs(L.batch_sizes.data(), L.steps, runs)) return false;
  const int device = like.get_device_index();
  const cudaStream_t stream = current_stream(like);
  persistent::Plan plan;
  if (!plan_cluster(L, H, G, device, concurrent, smem, plan)) return false;
  // The plan counts on every SM of the layer's share holding a CTA. Where the
  // device holds fewer of its clusters at once, it plans again on as many SMs
  // as they fill: fewer, larger tiles rather than a second wave of clusters.
  std::optional<ClusterLaunch<kernel>> launch;
  launch.emplace(plan, device, stream);
  const int held = launch->capacity() / std::max(1, concurrent);
  persistent::Plan again;
  if (held > 0 && plan.clusters > held &&
      plan_cluster(L, H, G, device, concurrent, smem, again, static_cast<int64_t>(held) * plan.size)) {
    plan = again;
    launch.emplace(plan, device, stream);
  }
  if (launch->capacity() == 0) return false;
  before();
  run(*launch, plan, runs);
  return true;
}

// Elman: one CTA or a cluster.
template <typename T, typename acc_t, Activation A>
bool launch_forward(const ForwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  const int H = static_cast<int>(job.w_hh.size(0));
  return run_cluster<persistent::forward_kernel<T, acc_t, A>>(
      L, H, 1, job.out, concurrent, persistent::forward_smem<T, acc_t>, [] {},
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.out), job.out.stride(0), ptr<T>(job.h0), job.h0.stride(0), ptr<T>(job.w_hh),
               runs, L.steps, L.batch, H, plan.units, plan.tile, plan.size, job.reverse);
        stepwise::copy_final_rows<CudaBackend>(*job.steps, job.out, job.h_n);
      });
}

template <typename T, typename acc_t, Activation A>
bool launch_backward(const BackwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  const int H = static_cast<int>(job.w_hh.size(0));
  return run_cluster<persistent::backward_kernel<T, acc_t, A>>(
      L, H, 1, job.out, concurrent, persistent::backward_smem<T, acc_t>,
      [&] {
        stepwise::take<CudaBackend>(job.dA, job.dY);
        stepwise::add_final_rows<CudaBackend>(*job.steps, job.dA, job.dh_n);
      },
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.dA), job.dA.stride(0), ptr<T>(job.out), job.out.stride(0), ptr<T>(job.grad_hx),
               job.grad_hx.stride(0), ptr<T>(job.w_hh), runs, L.steps, L.batch, H, plan.units,
               plan.tile, plan.size, job.reverse);
      });
}

// A cell's recurrence (an LSTM without projection; a GRU): one CTA or a cluster.
template <typename T, typename acc_t>
bool launch_cell(const LstmForwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  if (job.w_hr.defined() || job.x.defined()) return false;
  const int H = static_cast<int>(job.c.size(1));
  return run_cluster<persistent::lstm_forward_kernel<T, acc_t>>(
      L, H, persistent::kLstmGates, job.c, concurrent, persistent::lstm_forward_smem<T, acc_t>, [] {},
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.gates), job.gates.stride(0), ptr<T>(job.c), job.c.stride(0), ptr<T>(job.out),
               job.out.stride(0), ptr<T>(job.h0), job.h0.stride(0), ptr<T>(job.c0), job.c0.stride(0),
               ptr<T>(job.w_hh), runs, L.steps, L.batch, H, plan.units, plan.tile, plan.size,
               job.reverse);
        stepwise::copy_final_rows<CudaBackend>(*job.steps, job.out, job.h_n);
        stepwise::copy_final_rows<CudaBackend>(*job.steps, job.c, job.c_n);
      });
}

template <typename T, typename acc_t>
bool launch_cell(const LstmBackwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  if (job.w_hr.defined()) return false;
  const int H = static_cast<int>(job.c.size(1));
  return run_cluster<persistent::lstm_backward_kernel<T, acc_t>>(
      L, H, persistent::kLstmGates, job.c, concurrent, persistent::lstm_backward_smem<T, acc_t>,
      [&] {
        stepwise::take<CudaBackend>(job.gates, job.saved_gates);
        stepwise::add_final_rows<CudaBackend>(*job.steps, job.dh, job.dh_n);
      },
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.dh), job.dh.stride(0), ptr<T>(job.gates), job.gates.stride(0), ptr<T>(job.c),
               job.c.stride(0), ptr<T>(job.c0), job.c0.stride(0), ptr<T>(job.dc_n), job.dc_n.stride(0),
               ptr<T>(job.grad_hx), job.grad_hx.stride(0), ptr<T>(job.grad_cx), job.grad_cx.stride(0),
               ptr<T>(job.w_hh), runs, L.steps, L.batch, H, plan.units, plan.tile, plan.size,
               job.reverse);
      });
}

template <typename T, typename acc_t>
bool launch_cell(const GruForwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  const int H = static_cast<int>(job.hn.size(1));
  return run_cluster<persistent::gru_forward_kernel<T, acc_t>>(
      L, H, persistent::kGruGates, job.hn, concurrent, persistent::gru_forward_smem<T, acc_t>, [] {},
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.gates), job.gates.stride(0), ptr<T>(job.hn), job.hn.stride(0), ptr<T>(job.out),
               job.out.stride(0), ptr<T>(job.h0), job.h0.stride(0), ptr<T>(job.w_hh),
               job.b_hh.defined() ? ptr<T>(job.b_hh) : nullptr, runs, L.steps, L.batch, H,
               plan.units, plan.tile, plan.size, job.reverse);
        stepwise::copy_final_rows<CudaBackend>(*job.steps, job.out, job.h_n);
      });
}

template <typename T, typename acc_t>
bool launch_cell(const GruBackwardJob& job, int concurrent) {
  const SequenceLayout& L = *job.layout;
  const int H = static_cast<int>(job.hn.size(1));
  return run_cluster<persistent::gru_backward_kernel<T, acc_t>>(
      L, H, persistent::kGruGates, job.hn, concurrent, persistent::gru_backward_smem<T, acc_t>,
      [&] {
        stepwise::take<CudaBackend>(job.gates, job.saved_gates);
        stepwise::take<CudaBackend>(job.hn, job.saved_hn);
        stepwise::add_final_rows<CudaBackend>(*job.steps, job.dh, job.dh_n);
      },
      [&](const auto& launch, const persistent::Plan& plan, const persistent::Runs& runs) {
        launch(ptr<T>(job.dh), job.dh.stride(0), ptr<T>(job.gates), job.gates.stride(0), ptr<T>(job.hn),
               job.hn.stride(0), ptr<T>(job.out), job.out.stride(0), ptr<T>(job.h0), job.h0.stride(0),
               ptr<T>(job.grad_hx), job.grad_hx.stride(0), ptr<T>(job.w_hh), runs, L.steps,
               L.batch, H, plan.units, plan.tile, plan.size, job.reverse);
      });
}

// Blocks for a grid-stride pointwise kernel over n elements.
unsigned pointwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
}

// A stream and two events per device and host thread, made on first use and
// kept: where a layer's other directions run beside its first.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
};

SideStream& side_stream(int device) {
  thread_local SideStream sides[kMaxDevices];
  SideStream& s = sides[device];
  if (s.stream == nullptr) {
    cuda_check(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming), "cudaEventCreate");
    cuda_check(cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming), "cudaEventCreate");
    cuda_check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  return s;
}

// torch's current stream on `device` is `stream` while this lives (its
// GEMMs and copies go there too).
class StreamGuard {
 public:
  StreamGuard(cudaStream_t stream, int device) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_create_cuda_stream_guard(stream, device, &guard_));
  }
  ~StreamGuard() { (void)aoti_torch_delete_cuda_stream_guard(guard_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  CUDAStreamGuardHandle guard_ = nullptr;
};

// f(job, n) for each of a layer's n independent jobs (its directions), all at
// once: the first on the current stream, the others on the side stream, which
// forks from it and joins back into it through events. Nothing waits on the
// host, and a CUDA graph captures the fork and the join as edges. Each
// job's memory belongs to the op, which outlives the join, so the caching
// allocator needs no record_stream.
template <typename Job, typename F>
void concurrently(const std::vector<Job>& jobs, const F& f) {
  const int n = static_cast<int>(jobs.size());
  const int device = n > 1 ? jobs[0].w_hh.get_device_index() : -1;
  if (n < 2 || device < 0 || device >= kMaxDevices) {
    for (const Job& job : jobs) f(job, 1);
    return;
  }
  const cudaStream_t current = current_stream(jobs[0].w_hh);
  const SideStream& side = side_stream(device);
  cuda_check(cudaEventRecord(side.fork, current), "cudaEventRecord");
  cuda_check(cudaStreamWaitEvent(side.stream, side.fork, 0), "cudaStreamWaitEvent");
  // The current stream waits for the side's work however this scope is left.
  struct Join {
    const SideStream& side;
    cudaStream_t current;
    ~Join() {
      if (cudaEventRecord(side.join, side.stream) != cudaSuccess ||
          cudaStreamWaitEvent(current, side.join, 0) != cudaSuccess) {
        (void)cudaGetLastError();
        (void)cudaStreamSynchronize(side.stream);
      }
    }
  } join{side, current};
  f(jobs[0], n);
  const StreamGuard on_side(side.stream, device);
  for (int i = 1; i < n; ++i) f(jobs[i], n);
}

struct CudaBackend {
  static constexpr const char* device_name = "CUDA";

  static bool supports(ScalarType t) {
    return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
           t == ScalarType::BFloat16;
  }

  static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
    if (accumulate) {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(c.get(), c.get(), a.get(), b.get(), 1.0, 1.0));
    } else {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(c.get(), a.get(), b.get()));
    }
  }

  static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(c.get(), bias.get(), a.get(), b.get(), 1.0, 1.0));
  }

  template <typename F>
  static void with_dtype(ScalarType t, F&& f) {
    fastrnn::with_dtype(t, std::forward<F>(f));
  }

  template <typename F>
  static void for_each(const Tensor& like, int64_t rows, int64_t cols, const F& f) {
    const int64_t n = rows * cols;
    if (n == 0) return;
    for_each_kernel<<<pointwise_blocks(n), 256, 0, current_stream(like)>>>(f, rows, cols);
    check_launch("for_each_kernel");
  }

  // dst = src (copy_into) in one pointwise launch, for 1-D to 3-D tensors of
  // one dtype and shape with unit column strides; false for any other (torch's
  // copy_ then).
  static bool copy(const Tensor& dst, const Tensor& src) {
    const int64_t dims = dst.dim();
    if (dims < 1 || dims > 3 || src.dim() != dims || src.scalar_type() != dst.scalar_type()) return false;
    int64_t size[3] = {1, 1, 1}, d_stride[3] = {0, 0, 1}, s_stride[3] = {0, 0, 1};
    for (int64_t i = 0; i < dims; ++i) {
      const int64_t k = 3 - dims + i;
      if (src.size(i) != dst.size(i)) return false;
      size[k] = dst.size(i);
      d_stride[k] = dst.stride(i);
      s_stride[k] = src.stride(i);
    }
    if (size[2] > 1 && (d_stride[2] != 1 || s_stride[2] != 1)) return false;
    with_dtype(dst.scalar_type(), [&]<typename T>() {
      for_each(dst, size[0] * size[1], size[2],
               CopySteps<T>{ptr<T>(dst), ptr<const T>(src), size[1], d_stride[0], d_stride[1], s_stride[0],
                            s_stride[1]});
    });
    return true;
  }

  // out [C] = the column sums of t [N, C] (column_sums), for a t with unit
  // column stride and out of unit stride; false for any other (torch's sum then).
  static bool column_sums(const Tensor& out, const Tensor& t) {
    if (t.dim() != 2 || out.dim() != 1 || out.scalar_type() != t.scalar_type()) return false;
    const int64_t n = t.size(0), cols = t.size(1), chunks = std::max<int64_t>(1, (n + kSumRows - 1) / kSumRows);
    if ((cols > 1 && (t.stride(1) != 1 || out.stride(0) != 1)) || out.size(0) != cols || chunks > 65535) {
      return false;
    }
    if (cols == 0) return true;
    const cudaStream_t stream = current_stream(t);
    const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(chunks)), block(32, 8);
    with_dtype(t.scalar_type(), [&]<typename T>() {
      using acc_t = acc_type<T>;
      if (chunks == 1) {
        column_sum_kernel<T, acc_t><<<grid, block, 0, stream>>>(ptr<const T>(t), t.stride(0), n, cols, nullptr,
                                                                ptr<T>(out));
        check_launch("column_sum_kernel");
        return;
      }
      // The chunks' sums in acc_t, in a buffer of t's dtype sized to hold them.
      const Tensor partial = empty(t, {chunks * cols * static_cast<int64_t>(sizeof(acc_t) / sizeof(T))});
      column_sum_kernel<T, acc_t><<<grid, block, 0, stream>>>(ptr<const T>(t), t.stride(0), n, cols,
                                                              ptr<acc_t>(partial), nullptr);
      check_launch("column_sum_kernel");
      column_sum_chunks_kernel<T, acc_t><<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(
          ptr<const acc_t>(partial), chunks, cols, ptr<T>(out));
      check_launch("column_sum_chunks_kernel");
    });
    return true;
  }

  // A layer's directions run at once (concurrently()), each in a persistent
  // kernel where it takes the job, else with a GEMM and a pointwise kernel per step.
  static void forward_recurrences(const std::vector<ForwardJob>& jobs, Activation act) {
    concurrently(jobs, [&](const ForwardJob& job, int n) {
      if (!persistent_elman<true>(job, act, n)) stepwise::forward<CudaBackend>(job, act);
    });
  }
  static void backward_recurrences(const std::vector<BackwardJob>& jobs, Activation act) {
    concurrently(jobs, [&](const BackwardJob& job, int n) {
      if (!persistent_elman<false>(job, act, n)) stepwise::backward<CudaBackend>(job, act);
    });
  }
  template <typename Job>
  static void forward_recurrences(const std::vector<Job>& jobs) {
    concurrently(jobs, [&](const Job& job, int n) {
      if (!persistent_cell(job, n)) stepwise::forward<CudaBackend>(job);
    });
  }
  template <typename Job>
  static void backward_recurrences(const std::vector<Job>& jobs) {
    concurrently(jobs, [&](const Job& job, int n) {
      if (!persistent_cell(job, n)) stepwise::backward<CudaBackend>(job);
    });
  }

  template <bool Forward, typename Job>
  static bool persistent_elman(const Job& job, Activation act, int concurrent) {
    bool fused = false;
    if (!persistent_enabled()) return false;
    with_dtype(job.w_hh.scalar_type(), [&]<typename T>() {
      with_activation(act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        if constexpr (Forward) {
          fused = launch_forward<T, acc_type<T>, A>(job, concurrent);
        } else {
          fused = launch_backward<T, acc_type<T>, A>(job, concurrent);
        }
      });
    });
    return fused;
  }
  template <typename Job>
  static bool persistent_cell(const Job& job, int concurrent) {
    bool fused = false;
    if (!persistent_enabled()) return false;
    with_dtype(job.w_hh.scalar_type(), [&]<typename T>() { fused = launch_cell<T, acc_type<T>>(job, concurrent); });
    return fused;
  }
};

// Kernels run on the input's device whatever the current device is.
template <auto Op>
struct OnInputDevice;
template <typename R, typename... Args, R (*Op)(Tensor, Args...)>
struct OnInputDevice<Op> {
  static R call(Tensor input, Args... args) {
    torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
    return Op(std::move(input), std::move(args)...);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("rnn", TORCH_BOX(&OnInputDevice<&rnn_forward<CudaBackend>>::call));
  m.impl("rnn_backward", TORCH_BOX(&OnInputDevice<&rnn_backward<CudaBackend>>::call));
  m.impl("lstm", TORCH_BOX(&OnInputDevice<&lstm_forward<CudaBackend>>::call));
  m.impl("lstm_backward", TORCH_BOX(&OnInputDevice<&lstm_backward<CudaBackend>>::call));
  m.impl("gru", TORCH_BOX(&OnInputDevice<&gru_forward<CudaBackend>>::call));
  m.impl("gru_backward", TORCH_BOX(&OnInputDevice<&gru_backward<CudaBackend>>::call));
}

}  // namespace fastrnn
