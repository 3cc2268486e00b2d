// out[i, j] = x[i, j] * scale for 2-D tensors with any strides: the worked example of docs/adding-an-op.md.
#include "common/dtypes.cuh"

namespace cupy_ops_example {

// Pointers first (the runtime fills them per call), then what is fixed per layout.
struct ScaledCopyParams {
  void* out;                 // [rows, cols], T
  const void* x;             // [rows, cols], T
  long long rows;
  long long cols;
  long long out_stride[2];   // in elements
  long long x_stride[2];
  float scale;
};

// One thread per element of a 2-D grid: x walks columns, y walks rows (gridDim.y <= 65535 rows per launch row
// block; the grid-stride loop covers more).
template <typename T>
__global__ void scaled_copy_kernel(const ScaledCopyParams p) {
  const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.cols) return;
  for (long long row = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += static_cast<long long>(gridDim.y) * blockDim.y) {
    const T v = static_cast<const T*>(p.x)[row * p.x_stride[0] + col * p.x_stride[1]];
    static_cast<T*>(p.out)[row * p.out_stride[0] + col * p.out_stride[1]] =
        cupy_ops::from_float<T>(cupy_ops::to_float(v) * p.scale);
  }
}

}  // namespace cupy_ops_example
