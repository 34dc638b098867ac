// fastrnn CPU: portable SIMD vectors and runtime ISA selection for the
// recurrence kernel.
//
// The kernels are written once with GCC/Clang vector extensions
// (`T __attribute__((vector_size(...)))`) in always_inline templates that
// carry no target attribute; thin entry points with a target attribute
// (FASTRNN_TARGET_AVX512 / FASTRNN_TARGET_AVX2) instantiate them, and the
// compiler lowers the generic vectors and contracts a * b + c into FMA in
// that ISA. One binary built for baseline x86-64 thus carries an AVX-512, an
// AVX2+FMA and a baseline (SSE2) kernel and picks one at run time; aarch64
// and other targets get the baseline kernel on 16-byte vectors (NEON).
//
// Rule for code under these templates: never pass or return a vector by
// value across a function boundary (take it by reference). Clang rejects a
// 32/64-byte vector argument to a callee without the matching target feature,
// even an always_inline one.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#if defined(__GNUC__) && !defined(__clang__)
// The always_inline templates below take 32/64-byte vectors in functions that
// have no AVX target; they are only ever inlined into ones that do, so the
// "changes the ABI" note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// -DFASTRNN_X86_DISPATCH=0 builds the portable kernels alone, as on aarch64
// (the tests compile them so on x86 too).
#ifndef FASTRNN_X86_DISPATCH
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTRNN_X86_DISPATCH 1
#else
#define FASTRNN_X86_DISPATCH 0
#endif
#endif
// AVX-512 with VL: without it, 256-bit code (the half-vector last panels in
// the AVX-512 kernels) may use only ymm0-15, and the cells' forward tiles of
// 24 accumulators spilled to the stack on every multiply-add.
#if FASTRNN_X86_DISPATCH
#define FASTRNN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define FASTRNN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// AVX512-BF16 (vdpbf16ps: two bfloat16 products per float32 lane) for the
// kernels whose products run on bfloat16 pairs (tile_kernels.h). The
// instruction itself is inline assembly, not an intrinsic: the templates that
// issue it carry no target attribute (above), and an intrinsic cannot be
// inlined into them; the target attribute on the entry points is what lets
// the compiler give the asm its 64-byte registers.
#if FASTRNN_X86_DISPATCH && (defined(__clang__) ? __clang_major__ >= 11 : __GNUC__ >= 10)
#define FASTRNN_BF16_DISPATCH 1
#define FASTRNN_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma")))
#else
#define FASTRNN_BF16_DISPATCH 0
#endif

// AMX-BF16 tiles (amx_tiles.h), through inline assembly as vdpbf16ps; Linux
// only, where a process asks the kernel for the tile state.
#if FASTRNN_BF16_DISPATCH && defined(__linux__)
#define FASTRNN_AMX_DISPATCH 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FASTRNN_AMX_DISPATCH 0
#endif

#define FASTRNN_INLINE inline __attribute__((always_inline))

namespace fastrnn::cpu::simd {

// N lanes of T.
template <typename T, int N>
struct Vec {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// Unaligned load/store (memcpy compiles to one vector move).
template <typename V, typename T>
FASTRNN_INLINE void load(V& v, const T* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename T>
FASTRNN_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// out = x converted lane by lane (float to double). GCC lowers 8 floats to 8
// doubles as two 4-lane converts and two shuffles, three port-5 instructions
// where AVX-512 has one: that form, as inline assembly (an intrinsic cannot be
// inlined into these templates, which have no AVX-512 target themselves; a
// 64-byte vector only ever lives in the AVX-512 kernels).
template <typename VO, typename VI>
FASTRNN_INLINE void widen(VO& out, const VI& x) {
#if FASTRNN_X86_DISPATCH
  if constexpr (sizeof(VO) == 64 && sizeof(VI) == 32 && sizeof(x[0]) == 4) {
    asm("vcvtps2pd %1, %0" : "=v"(out) : "v"(x));
    return;
  }
#endif
  out = __builtin_convertvector(x, VO);
}

enum class Isa { Baseline = 0, Avx2 = 1, Avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

// The best ISA this CPU (and OS: __builtin_cpu_supports checks that the OS
// saves the wide registers) runs. FASTRNN_CPU_ISA=baseline|avx2 caps it, so
// that the tests can run every kernel on one machine; it never raises it.
inline Isa detect_isa() {
  Isa best = Isa::Baseline;
#if FASTRNN_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::Avx512;
  }
#endif
  if (const char* cap = std::getenv("FASTRNN_CPU_ISA")) {
    const std::string_view c(cap);
    const Isa limit = c == "baseline" ? Isa::Baseline : c == "avx2" ? Isa::Avx2 : best;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

inline Isa runtime_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

enum class Vendor { Other = 0, Amd = 1, Intel = 2 };

// Who made this CPU, for the choices measured to go differently on AMD's and
// Intel's (Other off x86).
inline Vendor cpu_vendor() {
  static const Vendor vendor = [] {
#if FASTRNN_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) return Vendor::Amd;
    if (__builtin_cpu_is("intel")) return Vendor::Intel;
#endif
    return Vendor::Other;
  }();
  return vendor;
}

// Whether the AVX-512 kernels may multiply bfloat16 pairs (AVX512-BF16).
inline bool has_bf16_dot() {
#if FASTRNN_BF16_DISPATCH
  static const bool yes = runtime_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

// Whether this CPU has AMX-BF16 and the OS lets this process use its tiles
// (asked once: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), beside
// the AVX512-BF16 kernels they serve.
inline bool has_amx_bf16() {
#if FASTRNN_AMX_DISPATCH
  static const bool yes = [] {
    if (!has_bf16_dot()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    if (!tile || !bf16) return false;
    unsigned lo = 0, hi = 0;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG, XTILEDATA
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace fastrnn::cpu::simd
