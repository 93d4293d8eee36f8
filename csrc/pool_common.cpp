// Argument checks, layout choice and allocation for the pooling operators, shared by every backend.
// Error messages follow torch's own for what torch rejects, and name the valid choices.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

#include "pool.h"

namespace lightning_vis {
namespace {

std::string join(const std::vector<int64_t>& v, const char* sep) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? sep : "") << v[i];
  return os.str();
}

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// torch's pooling_output_shape.
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  int64_t out = floor_div(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

std::vector<int64_t> expand(at::IntArrayRef v, int64_t nd, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 1 || static_cast<int64_t>(v.size()) == nd, op, ": ", name, " must be one int or ", nd,
              " ints for a ", nd, "D pool, got ", v.size(), " values");
  return v.size() == 1 ? std::vector<int64_t>(nd, v[0]) : v.vec();
}

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Pool parameters and the pooled input's (N, C, spatial...) sizes -> canonical geometry, with torch's checks.
PoolGeom make_geometry(const char* op, at::IntArrayRef sizes, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, bool check_output = true) {
  const int64_t nd = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(nd >= 1 && nd <= 3, op, ": kernel_size must have 1, 2 or 3 values (a 1D, 2D or 3D pool), got ",
              kernel.size());
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == nd + 2, op, ": a ", nd, "D pool expects a batched input of shape ",
              nd == 1 ? "(N, C, L)" : nd == 2 ? "(N, C, H, W)" : "(N, C, T, H, W)", " (rank ", nd + 2, "), got shape ",
              sizes, " (rank ", sizes.size(), ")");
  auto k = kernel.vec();
  auto s = stride.empty() ? k : expand(stride, nd, op, "stride");
  auto p = expand(padding, nd, op, "padding");
  auto d = expand(dilation, nd, op, "dilation");
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK(k[i] > 0, op, ": kernel_size must be greater than zero, but got kernel_size=(", join(k, ", "), ")");
    TORCH_CHECK(s[i] > 0, op, ": stride must be greater than zero, but got stride=(", join(s, ", "), ")");
    TORCH_CHECK(d[i] > 0, op, ": dilation must be greater than zero, but got dilation=(", join(d, ", "), ")");
    TORCH_CHECK(p[i] >= 0, op, ": padding must be non-negative, but got padding=(", join(p, ", "), ")");
    TORCH_CHECK(p[i] <= k[i] / 2, op, ": pad should be at most half of effective kernel size, but got pad=", p[i],
                ", kernel_size=", k[i], " and dilation=", d[i]);
  }
  TORCH_CHECK(sizes[1] > 0, op, ": expected a non-empty channel dim, got input of shape ", sizes);
  std::vector<int64_t> in(sizes.begin() + 2, sizes.end()), out(nd);
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK(in[i] > 0, op, ": expected non-empty spatial dims, got input of shape ", sizes);
    out[i] = pooled_size(in[i], k[i], s[i], p[i], d[i], ceil_mode);
  }
  for (int64_t i = 0; i < nd && check_output; ++i) {
    TORCH_CHECK(out[i] >= 1, op, ": Given input size: (", sizes[1], "x", join(in, "x"),
                "). Calculated output size: (", sizes[1], "x", join(out, "x"),
                "). Output size is too small: the window (kernel_size ", k[i], ", dilation ", d[i],
                ") is larger than the padded input");
  }
  int64_t window = 1;
  for (auto v : k) window *= v;
  TORCH_CHECK(window < (int64_t(1) << 31), op, ": a window of ", window, " cells is too large");

  PoolGeom g;
  g.N = sizes[0];
  g.C = sizes[1];
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t j = 3 - nd + i;
    g.in[j] = in[i];
    g.out[j] = out[i];
    g.k[j] = k[i];
    g.s[j] = s[i];
    g.p[j] = p[i];
    g.d[j] = d[i];
  }
  return g;
}

at::ScalarType switch_dtype(int64_t window) { return window <= 255 ? at::kByte : at::kInt; }

// Dense (N, spatial..., C) storage, seen as (N, C, spatial...).
bool is_channels_last_dense(const at::Tensor& t) { return t.movedim(1, -1).is_contiguous(); }

// Planar is preferred whenever the tensor already is planar-dense (also when both layouts coincide).
bool pick_channels_last(const at::Tensor& t) { return !t.is_contiguous() && is_channels_last_dense(t); }

at::Tensor to_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

at::Tensor empty_in_layout(at::IntArrayRef shape, bool channels_last, const at::TensorOptions& opts) {
  if (!channels_last) return at::empty(shape, opts);
  std::vector<int64_t> cl_shape(shape.begin(), shape.end());
  cl_shape.erase(cl_shape.begin() + 1);
  cl_shape.push_back(shape[1]);
  return at::empty(cl_shape, opts).movedim(-1, 1);
}

std::vector<int64_t> pooled_shape(const PoolGeom& g, int64_t nd) {
  std::vector<int64_t> shape{g.N, g.C};
  for (int64_t i = 3 - nd; i < 3; ++i) shape.push_back(g.out[i]);
  return shape;
}

void check_data_and_switches(const char* op, const char* name, const at::Tensor& data, const at::Tensor& switches) {
  TORCH_CHECK(is_floating(data.scalar_type()), op, ": ", name, " dtype ", data.scalar_type(),
              " is not supported; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(data.device() == switches.device(), op, ": ", name, " on ", data.device(), " but switches on ",
              switches.device());
}

// Geometry of pooling an input of in_sizes into pooled_sizes, in floor or ceil mode, whichever gives them.
PoolGeom geometry_matching(const char* op, at::IntArrayRef in_sizes, at::IntArrayRef pooled_sizes,
                           at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  const int64_t nd = static_cast<int64_t>(kernel.size());
  const PoolGeom floor = make_geometry(op, in_sizes, kernel, stride, padding, dilation, false, false);
  if (at::IntArrayRef(pooled_shape(floor, nd)) == pooled_sizes) return floor;
  const PoolGeom ceil = make_geometry(op, in_sizes, kernel, stride, padding, dilation, true, false);
  TORCH_CHECK(at::IntArrayRef(pooled_shape(ceil, nd)) == pooled_sizes, op, ": a pooled shape of ", pooled_sizes,
              " cannot come from pooling an input of shape ", in_sizes, " (that gives ",
              at::IntArrayRef(pooled_shape(floor, nd)), "); pass the pooled input's size as output_size");
  return ceil;
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

void check_switches(const char* op, const at::Tensor& switches, const PoolGeom& g, at::IntArrayRef expected_shape) {
  const auto want = switch_dtype(g.window());
  TORCH_CHECK(switches.scalar_type() == want, op, ": switches must be ", dtype_name(want), " for a window of ",
              g.window(), " cells, got ", dtype_name(switches.scalar_type()),
              (switches.scalar_type() == at::kLong ? " (torch's flat indices? convert them with indices_to_switches)" : ""));
  TORCH_CHECK(switches.sizes() == expected_shape, op, ": switches of shape ", switches.sizes(),
              " do not match the pooled shape ", expected_shape);
}

}  // namespace

gpu::Dtype gpu_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return gpu::Dtype::F32;
    case at::kDouble: return gpu::Dtype::F64;
    case at::kHalf: return gpu::Dtype::F16;
    case at::kBFloat16: return gpu::Dtype::BF16;
    default: TORCH_CHECK(false, "lightning_vis GPU kernels: unsupported dtype ", t.scalar_type());
  }
}

gpu::SwitchDtype gpu_switch_dtype(const at::Tensor& switches) {
  return switches.scalar_type() == at::kByte ? gpu::SwitchDtype::U8 : gpu::SwitchDtype::I32;
}

std::tuple<at::Tensor, at::Tensor> max_pool_with_switches_impl(
    const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, PoolKernel kernel_fn) {
  constexpr const char* op = "max_pool_with_switches";
  TORCH_CHECK(is_floating(x.scalar_type()), op, ": input dtype ", x.scalar_type(),
              " is not supported; expected float32, float64, float16 or bfloat16");
  PoolGeom g = make_geometry(op, x.sizes(), kernel, stride, padding, dilation, ceil_mode);
  const int64_t nd = static_cast<int64_t>(kernel.size());
  g.channels_last = pick_channels_last(x);
  const at::Tensor xd = to_layout(x, g.channels_last);
  const auto shape = pooled_shape(g, nd);
  at::Tensor values = empty_in_layout(shape, g.channels_last, x.options());
  at::Tensor switches = empty_in_layout(shape, g.channels_last, x.options().dtype(switch_dtype(g.window())));
  if (values.numel() > 0) kernel_fn(g, xd, values, switches);
  return {values, switches};
}

at::Tensor unpool_impl(const at::Tensor& values, const at::Tensor& switches, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       at::IntArrayRef output_size, UnpoolKernel kernel_fn) {
  constexpr const char* op = "unpool";
  check_data_and_switches(op, "values", values, switches);
  const int64_t nd = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(static_cast<int64_t>(output_size.size()) == nd, op, ": output_size must give the ", nd,
              " spatial sizes of the pooled input, got ", output_size);
  TORCH_CHECK(values.dim() == nd + 2, op, ": a ", nd, "D unpool expects batched values of rank ", nd + 2,
              ", got shape ", values.sizes());
  std::vector<int64_t> in_sizes{values.size(0), values.size(1)};
  in_sizes.insert(in_sizes.end(), output_size.begin(), output_size.end());
  PoolGeom g = geometry_matching(op, in_sizes, values.sizes(), kernel, stride, padding, dilation);
  check_switches(op, switches, g, values.sizes());
  g.channels_last = pick_channels_last(values) && is_channels_last_dense(switches);
  const at::Tensor vd = to_layout(values, g.channels_last), sd = to_layout(switches, g.channels_last);
  at::Tensor out = empty_in_layout(in_sizes, g.channels_last, values.options());
  if (out.numel() > 0) kernel_fn(g, vd, sd, out);
  return out;
}

at::Tensor gather_switches_impl(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef kernel,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                GatherKernel kernel_fn) {
  constexpr const char* op = "gather_switches";
  check_data_and_switches(op, "grad", grad, switches);
  const int64_t nd = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(switches.dim() == nd + 2, op, ": switches of shape ", switches.sizes(), " are not a batched ", nd,
              "D pooled tensor");
  PoolGeom g = geometry_matching(op, grad.sizes(), switches.sizes(), kernel, stride, padding, dilation);
  check_switches(op, switches, g, switches.sizes());
  g.channels_last = pick_channels_last(switches);
  const at::Tensor gd = to_layout(grad, g.channels_last), sd = to_layout(switches, g.channels_last);
  at::Tensor out = empty_in_layout(switches.sizes(), g.channels_last, grad.options());
  if (out.numel() > 0) kernel_fn(g, gd, sd, out);
  return out;
}

}  // namespace lightning_vis
