// The CUDA-semantics simulator: a test-only extension (built by tests/_cuda_sim.py, never part of lightning_vis._C)
// that runs the CUDA kernels' own bodies (cuda/pool_bodies.h, cuda/fft_image_bodies.h) on the CPU, as NUMBA's CUDA
// simulator does for Python kernels.
//
// Its operators (torch.ops.lightning_vis_sim.*, the schemas of lightning_vis) go through the same argument checks,
// layouts and allocations as the real ones (pool_common.cpp, fft_image_common.cpp), then through the same planner as
// the GPU launcher (dispatch_*), which picks the body, the index type, the vector width and the grid; the simulator
// then calls the body for every thread of every block of that grid, in order. Each operator call:
// - copies every tensor of the launch into a shadow buffer with guard bytes on both sides and the same address
//   modulo 64 as the original (so every alignment branch goes the same way), outputs poisoned with 0xFF;
// - checks every access of a body (single_source.h): inside one of those buffers, aligned to its width, no write to
//   an input, no read of an output; the first fault stops the call with the kernel, block, thread and address;
// - checks that every output element was written exactly once, then copies the outputs back.
// configure() caps the grid (so that grid-stride loops stride) and forces the 64-bit index bodies; path_counts()
// and plans() tell the tests which branches and launches ran.
#include <torch/extension.h>

#include <array>
#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/fft_image_bodies.h"
#include "../cuda/pool_bodies.h"
#include "../fft_image.h"
#include "../pool.h"
#include "../schemas.h"

namespace lightning_vis {
namespace sim {
namespace {

constexpr std::size_t kGuard = 256;  // bytes of no-man's-land on each side of a shadow buffer

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Buffer {
  std::string name;
  bool output = false;
  std::size_t elem = 1, bytes = 0;
  std::unique_ptr<uint8_t[]> storage;
  uint8_t* data = nullptr;
  std::vector<uint8_t> writes;  // per element (saturating)
  at::Tensor target;            // where an output goes back to
};

struct State {
  std::vector<std::unique_ptr<Buffer>> buffers;  // of the call in progress
  std::string kernel;
  uint32_t block = 0, thread = 0;
  std::array<int64_t, static_cast<int>(gpu::Path::count)> paths{};
  std::vector<gpu::Plan> plans;
  gpu::Limits limits;
};

State& state() {
  static State s;
  return s;
}

const char* kPathNames[] = {
#define LV_PATH_NAME(name) #name,
    LV_KERNEL_PATHS(LV_PATH_NAME)
#undef LV_PATH_NAME
};

[[noreturn]] void fault(const std::string& what) {
  const State& s = state();
  std::ostringstream os;
  os << "CUDA simulator: kernel " << s.kernel << ", block " << s.block << ", thread " << s.thread << ": " << what;
  throw Fault(os.str());
}

// A shadow copy of t's storage (a dense tensor), aligned like t modulo 64.
Buffer& add_buffer(const std::string& name, const at::Tensor& t, bool output) {
  auto b = std::make_unique<Buffer>();
  b->name = name;
  b->output = output;
  b->elem = t.element_size();
  b->bytes = t.numel() * b->elem;
  b->storage.reset(new uint8_t[b->bytes + 2 * kGuard + 128]);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(b->storage.get()) + kGuard;
  const uintptr_t want = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 64;
  b->data = reinterpret_cast<uint8_t*>((raw + 63) / 64 * 64 + want);
  std::memset(b->storage.get(), 0xA5, b->bytes + 2 * kGuard + 128);
  if (output) {
    std::memset(b->data, 0xFF, b->bytes);  // NaN in every float type, 255 / -1 as a switch
    b->writes.assign(t.numel(), 0);
    b->target = t;
  } else if (b->bytes) {
    std::memcpy(b->data, t.const_data_ptr(), b->bytes);
  }
  state().buffers.push_back(std::move(b));
  return *state().buffers.back();
}

std::string where(uintptr_t a) {
  std::ostringstream os;
  const Buffer* best = nullptr;
  int64_t best_d = 0;
  for (const auto& b : state().buffers) {
    const auto lo = reinterpret_cast<uintptr_t>(b->data);
    const int64_t d = a < lo ? int64_t(lo - a) : int64_t(a - (lo + b->bytes));
    if (!best || d < best_d) best = b.get(), best_d = d;
  }
  if (!best) return "no tensor in this launch";
  const auto lo = reinterpret_cast<uintptr_t>(best->data);
  if (a < lo) os << (lo - a) << " bytes before the start of '" << best->name << "'";
  else if (a >= lo + best->bytes) os << (a - lo - best->bytes) << " bytes past the end of '" << best->name << "'";
  else os << "byte " << (a - lo) << " of '" << best->name << "', running past its end";
  os << " (" << best->bytes / best->elem << " elements of " << best->elem << " bytes)";
  return os.str();
}

}  // namespace

void check_access(const void* p, std::size_t bytes, std::size_t align, bool write) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const char* what = write ? "store" : "load";
  for (const auto& b : state().buffers) {
    const auto lo = reinterpret_cast<uintptr_t>(b->data);
    if (a < lo || a + bytes > lo + b->bytes) continue;
    if (a % align != 0) {
      std::ostringstream os;
      os << "misaligned " << bytes << "-byte " << what << " at byte " << (a - lo) << " of '" << b->name
         << "' (the address must be a multiple of " << align << ")";
      fault(os.str());
    }
    if (write && !b->output) fault(std::string("store into the input '") + b->name + "'");
    if (!write && b->output) fault(std::string("load from the output '") + b->name + "' (bodies never read outputs)");
    if (write) {
      for (std::size_t e = (a - lo) / b->elem, end = (a - lo + bytes) / b->elem; e < end; ++e) {
        if (b->writes[e] < 255) ++b->writes[e];
      }
    }
    return;
  }
  std::ostringstream os;
  os << "out-of-bounds " << bytes << "-byte " << what << ": " << where(a);
  fault(os.str());
}

void count_path(gpu::Path path) { ++state().paths[static_cast<int>(path)]; }

namespace {

// The simulator's launcher: every thread of every block of the plan's grid, in order.
struct SimLaunch {
  template <class K>
  void operator()(const K& k, const gpu::Plan& p) const {
    State& s = state();
    s.plans.push_back(p);
    s.kernel = p.kernel;
    const auto grid = static_cast<uint32_t>(p.blocks), threads = static_cast<uint32_t>(p.threads);
    for (uint32_t b = 0; b < grid; ++b) {
      for (uint32_t t = 0; t < threads; ++t) {
        s.block = b;
        s.thread = t;
        k(gpu::Thread{b, t, grid, threads});
      }
    }
  }
};

// One simulated operator call: buffers in, launch(es), every output element written once, outputs back.
template <class F>
void simulate(const char* op, F&& body) {
  State& s = state();
  s.buffers.clear();
  s.kernel = std::string("(") + op + " planner)";
  try {
    body();
    for (const auto& b : s.buffers) {
      if (!b->output) continue;
      int64_t missed = 0, twice = 0, first = -1;
      for (std::size_t e = 0; e < b->writes.size(); ++e) {
        if (b->writes[e] == 0) ++missed;
        if (b->writes[e] > 1) ++twice;
        if (b->writes[e] != 1 && first < 0) first = static_cast<int64_t>(e);
      }
      if (missed || twice) {
        std::ostringstream os;
        os << "CUDA simulator: " << op << ": output '" << b->name << "' has " << missed
           << " elements never written and " << twice << " written more than once (of " << b->writes.size() << "; first: element " << first
           << ", written " << int(b->writes[first]) << " times)";
        throw Fault(os.str());
      }
      std::memcpy(b->target.mutable_data_ptr(), b->data, b->bytes);
    }
  } catch (const Fault& f) {
    s.buffers.clear();
    TORCH_CHECK(false, f.what());
  }
  s.buffers.clear();
}

const void* in(const char* name, const at::Tensor& t) { return add_buffer(name, t, false).data; }
void* out(const char* name, at::Tensor& t) { return add_buffer(name, t, true).data; }

void pool_sim(const PoolGeom& g, const at::Tensor& x, at::Tensor& values, at::Tensor& switches) {
  simulate("max_pool_with_switches", [&] {
    SimLaunch launch;
    gpu::dispatch_pool(launch, g, gpu_dtype(x), gpu_switch_dtype(switches), in("input", x), out("values", values),
                       out("switches", switches), state().limits);
  });
}

void unpool_sim(const PoolGeom& g, const at::Tensor& values, const at::Tensor& switches, at::Tensor& result) {
  simulate("unpool", [&] {
    SimLaunch launch;
    gpu::dispatch_unpool(launch, g, gpu_dtype(values), gpu_switch_dtype(switches), in("values", values),
                         in("switches", switches), out("out", result), state().limits);
  });
}

void gather_sim(const PoolGeom& g, const at::Tensor& grad, const at::Tensor& switches, at::Tensor& result) {
  simulate("gather_switches", [&] {
    SimLaunch launch;
    gpu::dispatch_gather(launch, g, gpu_dtype(grad), gpu_switch_dtype(switches), in("grad", grad),
                         in("switches", switches), out("out", result), state().limits);
  });
}

void mix_sim(const at::Tensor& img, const at::Tensor& color, bool use_color, bool sigmoid, at::Tensor& result) {
  simulate("fft_image", [&] {
    SimLaunch launch;
    gpu::dispatch_fft_mix(launch, img.scalar_type() == at::kDouble, in("img", img),
                          use_color ? in("color", color) : nullptr, out("out", result), img.size(0), img.size(1),
                          img.size(2), sigmoid, state().limits);
  });
}

void mix_back_sim(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& color, bool use_color, bool sigmoid,
                  at::Tensor& grad_img) {
  simulate("fft_image_backward", [&] {
    SimLaunch launch;
    gpu::dispatch_fft_mix_backward(launch, y.scalar_type() == at::kDouble, in("grad", grad), in("out", y),
                                   use_color ? in("color", color) : nullptr, out("grad_img", grad_img), y.size(0),
                                   y.size(1), y.size(2), sigmoid, state().limits);
  });
}

// ------------------------------------------------------------------------------------------------------------------
// Self-test of the checker: small bodies with one deliberate fault each (never part of the real kernels).

struct Faulty {
  int kind;
  const float* x;
  float* y;
  int64_t n;
  void operator()(const gpu::Thread& th) const {
    for (int64_t i = gpu::first_item<int64_t>(th); i < n; i += gpu::grid_stride<int64_t>(th)) {
      switch (kind) {
        case 0: gpu::st(y + i, gpu::ld(x + i + 1)); break;                        // reads one past the end
        case 1: gpu::st(y + i, gpu::ld_vec<4>(x + 1).v[0]); break;                // a 16-byte load off alignment
        case 2: gpu::st(y + i, 1.0f); gpu::st(y + (i + 1) % n, 2.0f); break;     // every element written twice
        case 3: if (i != n / 2) gpu::st(y + i, 1.0f); break;                     // one element never written
        case 4: gpu::st(const_cast<float*>(x) + i, 1.0f); gpu::st(y + i, 1.0f); break;  // writes its input
        case 5: gpu::st(y + i, gpu::ld(y + i)); break;                           // reads its output
        default: gpu::st(y + i, gpu::ld(x + i)); break;                          // correct
      }
    }
  }
};

void selftest(const std::string& fault_kind) {
  static const char* kinds[] = {"out_of_bounds_load", "misaligned_vector_load", "double_write",
                                "missed_write",        "store_into_input",       "load_from_output", "none"};
  int kind = -1;
  for (int i = 0; i < 7; ++i) {
    if (fault_kind == kinds[i]) kind = i;
  }
  TORCH_CHECK(kind >= 0, "selftest: unknown fault kind '", fault_kind, "'");
  at::Tensor x = at::arange(1000, at::kFloat), y = at::empty({1000}, at::kFloat);
  simulate("selftest", [&] {
    SimLaunch launch;
    const int64_t n = x.numel();
    launch(Faulty{kind, static_cast<const float*>(in("x", x)), static_cast<float*>(out("y", y)), n},
           gpu::make_plan(kinds[kind], 64, 1, n, state().limits));
  });
  TORCH_CHECK(at::equal(x, y), "selftest: the correct body gave wrong values");
}

void configure(int64_t max_blocks, bool force_int64) {
  TORCH_CHECK(max_blocks >= 1, "configure: max_blocks must be >= 1, got ", max_blocks);
  state().limits.max_blocks = max_blocks;
  state().limits.force_int64 = force_int64;
}

void reset() {
  state().paths.fill(0);
  state().plans.clear();
}

pybind11::dict path_counts() {
  pybind11::dict d;
  for (int i = 0; i < static_cast<int>(gpu::Path::count); ++i) d[kPathNames[i]] = state().paths[i];
  return d;
}

pybind11::list plans() {
  pybind11::list l;
  for (const auto& p : state().plans) {
    pybind11::dict d;
    d["kernel"] = p.kernel;
    d["shape"] = p.shape;
    d["index_bits"] = p.index_bits;
    d["vec"] = p.vec;
    d["work"] = p.work;
    d["blocks"] = p.blocks;
    d["threads"] = p.threads;
    l.append(d);
  }
  return l;
}

}  // namespace
}  // namespace sim

TORCH_LIBRARY(lightning_vis_sim, m) { define_schemas(m); }

TORCH_LIBRARY_IMPL(lightning_vis_sim, CPU, m) {
  m.impl("max_pool_with_switches", &pool_op<sim::pool_sim>);
  m.impl("unpool", &unpool_op<sim::unpool_sim>);
  m.impl("gather_switches", &gather_op<sim::gather_sim>);
  m.impl("fft_image", &fft_image_op<sim::mix_sim>);
  m.impl("fft_image_backward", &fft_image_backward_op<sim::mix_back_sim>);
}

}  // namespace lightning_vis

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace lightning_vis::sim;
  m.doc() = "CUDA-semantics simulator of lightning-vis's CUDA kernels (test-only; ops in torch.ops.lightning_vis_sim)";
  m.def("configure", &configure, pybind11::arg("max_blocks") = lightning_vis::gpu::Limits{}.max_blocks,
        pybind11::arg("force_int64") = false,
        "Grid cap (default: the real launcher's for an H100, 132 SMs x 32 blocks) and forced 64-bit indexing.");
  m.def("reset", &reset, "Zero the path counters, forget the plans.");
  m.def("path_counts", &path_counts, "Times each branch of the kernel bodies ran since reset().");
  m.def("plans", &plans, "The launches since reset(): kernel, shape, index_bits, vec, work, blocks, threads.");
  m.def("selftest", &selftest, "Run a body with a deliberate fault of the given kind through the checker.");
#if defined(LV_SIM_CUDA_HEADERS)
  m.attr("fp16_headers") = "cuda";
#else
  m.attr("fp16_headers") = "shim";
#endif
}
