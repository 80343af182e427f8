// A quantized matrix product for a few rows, for x86-64 CPUs with AVX2 and FMA.
//
// MLX's CPU backend multiplies by quantized weights one element at a time,
// which makes decoding with quantized weights slower than with float32 ones.
// This primitive reads MLX's affine-quantized layout directly (each row a
// little-endian bit stream of 2-, 3-, 4-, 5-, 6- or 8-bit integers; one
// float scale and bias per group of `group_size` weights along the input
// axis) and unpacks eight weights at a time into AVX2 registers, so a
// decode step reads 4-16x fewer bytes than float32 and runs faster too.
//
//   out[m, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] * x[m, k])
//             + sum_g bias[n, g]  * (sum_{k in g} x[m, k])
//
// The second line needs only per-group sums of x, computed once per call.
// Output rows of large matrices are split across threads with OpenMP, whose
// idle threads sleep rather than spin (OMP_WAIT_POLICY=passive, set by the
// loader): spinning threads starve the rest of the process, or another
// program, on a machine with few cores.

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Rows of x handled together: each unpacked weight vector is used ROWS times.
constexpr int kMaxRows = 4;
// Output features per OpenMP work item.
constexpr int kBlock = 16;
// Matrices smaller than this (in weights) run on one thread: waking a
// second costs more than it saves there (SmolLM2-135M decodes 55 tokens/s
// single-threaded against 38 with every product split in two).
constexpr long kParallelWeights = 1L << 22;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Eight weights as floats, starting at element `i` (a multiple of 8) of a
// row. MLX packs a row as one little-endian bit stream, element j at bits
// [j * BITS, (j + 1) * BITS), so eight elements fill exactly BITS bytes.
//
// For 2, 3, 5 and 6 bits the eight are read as one 64-bit load that runs
// past them into the next weights; `last` marks the final group of the
// whole matrix, where nothing follows and the bytes are copied instead.
template <int BITS>
inline __m256 unpack8(const uint32_t* row, int i, bool last) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row) + i / 8 * BITS;
  if constexpr (BITS == 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  } else if constexpr (BITS == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    uint32_t word;
    std::memcpy(&word, bytes, 4);
    __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
  } else {
    // 2, 3, 5 or 6 bits: the eight fit in 64 bits; shift each into place
    // in 64-bit lanes, then gather the low halves into eight 32-bit lanes.
    uint64_t stream = 0;
    if (last) {
      std::memcpy(&stream, bytes, BITS);
    } else {
      std::memcpy(&stream, bytes, 8);  // one unaligned load
    }
    const __m256i all = _mm256_set1_epi64x(static_cast<long long>(stream));
    const __m256i low = _mm256_srlv_epi64(
        all, _mm256_setr_epi64x(0, BITS, 2 * BITS, 3 * BITS));
    const __m256i high = _mm256_srlv_epi64(
        all, _mm256_setr_epi64x(4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS));
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i q = _mm256_blend_epi32(
        _mm256_permutevar8x32_epi32(low, even),
        _mm256_permutevar8x32_epi32(high, even), 0xF0);
    q = _mm256_and_si256(q, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(q);
  }
}

// Output features [n0, n1) for ROWS rows of x.
template <int BITS, int ROWS>
void matvec_block(
    const float* x, const float* x_group_sums, const uint32_t* w,
    const float* scales, const float* biases, float* out,
    int K, int N, int group_size, int n0, int n1) {
  const int words_per_row = K * BITS / 32;
  const int groups = K / group_size;
  for (int n = n0; n < n1; n++) {
    const uint32_t* w_row = w + static_cast<size_t>(n) * words_per_row;
    const float* s_row = scales + static_cast<size_t>(n) * groups;
    const float* b_row = biases + static_cast<size_t>(n) * groups;
    __m256 total[ROWS];
    float bias_part[ROWS];
    for (int r = 0; r < ROWS; r++) {
      total[r] = _mm256_setzero_ps();
      bias_part[r] = 0.0f;
    }
    for (int g = 0; g < groups; g++) {
      __m256 acc[ROWS];
      for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
      const bool last = n == N - 1 && g == groups - 1;
      for (int i = g * group_size; i < (g + 1) * group_size; i += 8) {
        __m256 q = unpack8<BITS>(w_row, i, last);
        for (int r = 0; r < ROWS; r++) {
          __m256 xv = _mm256_loadu_ps(x + static_cast<size_t>(r) * K + i);
          acc[r] = _mm256_fmadd_ps(q, xv, acc[r]);
        }
      }
      __m256 scale = _mm256_set1_ps(s_row[g]);
      for (int r = 0; r < ROWS; r++) {
        total[r] = _mm256_fmadd_ps(scale, acc[r], total[r]);
        bias_part[r] += b_row[g] * x_group_sums[static_cast<size_t>(r) * groups + g];
      }
    }
    for (int r = 0; r < ROWS; r++) {
      out[static_cast<size_t>(r) * N + n] = horizontal_sum(total[r]) + bias_part[r];
    }
  }
}

template <int BITS, int ROWS>
void matvec(
    const float* x, const uint32_t* w, const float* scales, const float* biases,
    float* out, int K, int N, int group_size) {
  const int groups = K / group_size;
  std::vector<float> x_group_sums(static_cast<size_t>(ROWS) * groups);
  for (int r = 0; r < ROWS; r++) {
    for (int g = 0; g < groups; g++) {
      const float* xs = x + static_cast<size_t>(r) * K + g * group_size;
      float sum = 0.0f;
      for (int k = 0; k < group_size; k++) sum += xs[k];
      x_group_sums[static_cast<size_t>(r) * groups + g] = sum;
    }
  }
  const int blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (static_cast<long>(N) * K >= kParallelWeights)
  for (int b = 0; b < blocks; b++) {
    matvec_block<BITS, ROWS>(
        x, x_group_sums.data(), w, scales, biases, out, K, N, group_size,
        b * kBlock, std::min(N, (b + 1) * kBlock));
  }
}

template <int BITS>
void matvec_rows(
    const float* x, const uint32_t* w, const float* scales, const float* biases,
    float* out, int M, int K, int N, int group_size) {
  for (int m = 0; m < M; m += kMaxRows) {
    const float* xm = x + static_cast<size_t>(m) * K;
    float* om = out + static_cast<size_t>(m) * N;
    switch (std::min(kMaxRows, M - m)) {
      case 1: matvec<BITS, 1>(xm, w, scales, biases, om, K, N, group_size); break;
      case 2: matvec<BITS, 2>(xm, w, scales, biases, om, K, N, group_size); break;
      case 3: matvec<BITS, 3>(xm, w, scales, biases, om, K, N, group_size); break;
      default: matvec<BITS, 4>(xm, w, scales, biases, om, K, N, group_size); break;
    }
  }
}

class QuantizedMatVec : public mx::Primitive {
 public:
  QuantizedMatVec(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& scales = inputs[2];
    const mx::array& biases = inputs[3];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));

    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);

    const int K = x.shape(-1);
    const int N = out.shape(-1);
    const int M = static_cast<int>(x.size() / K);
    encoder.dispatch([x = x.data<float>(), w = w.data<uint32_t>(),
                      scales = scales.data<float>(), biases = biases.data<float>(),
                      out = out.data<float>(), M, K, N, group_size = group_size_,
                      bits = bits_]() {
      switch (bits) {
        case 2: matvec_rows<2>(x, w, scales, biases, out, M, K, N, group_size); break;
        case 3: matvec_rows<3>(x, w, scales, biases, out, M, K, N, group_size); break;
        case 4: matvec_rows<4>(x, w, scales, biases, out, M, K, N, group_size); break;
        case 5: matvec_rows<5>(x, w, scales, biases, out, M, K, N, group_size); break;
        case 6: matvec_rows<6>(x, w, scales, biases, out, M, K, N, group_size); break;
        default: matvec_rows<8>(x, w, scales, biases, out, M, K, N, group_size); break;
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[quantized_matvec] runs on the CPU only");
  }

  // Gradient with respect to x only (the weights are frozen), as LoRA on a
  // quantized base needs: x_grad = cotangent @ W, with MLX's own kernel.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg != 0) {
        throw std::invalid_argument(
            "[quantized_matvec] quantized weights have no gradient");
      }
      grads.push_back(mx::quantized_matmul(
          cotangents[0], primals[1], primals[2], primals[3], /*transpose=*/false,
          group_size_, bits_, "affine", stream()));
    }
    return grads;
  }

  const char* name() const override { return "QuantizedMatVec"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatVec&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_;
  int bits_;
};

mx::array quantized_matvec(const mx::array& x, const mx::array& w,
                           const mx::array& scales, const mx::array& biases,
                           int group_size, int bits) {
  if (bits < 2 || bits > 8 || bits == 7) {
    throw std::invalid_argument("[quantized_matvec] bits must be 2, 3, 4, 5, 6 or 8");
  }
  if (group_size % 8 != 0 || x.ndim() < 1 || x.shape(-1) % group_size != 0 ||
      w.ndim() != 2 || w.shape(1) * 32 / bits != x.shape(-1)) {
    throw std::invalid_argument("[quantized_matvec] shapes do not match");
  }
  mx::StreamOrDevice s = mx::Device::cpu;
  auto as_f32 = [&](const mx::array& a) {
    return mx::contiguous(mx::astype(a, mx::float32, s), false, s);
  };
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(
      shape, mx::float32,
      std::make_shared<QuantizedMatVec>(mx::to_stream(s), group_size, bits),
      {as_f32(x), mx::contiguous(w, false, s), as_f32(scales), as_f32(biases)});
}

}  // namespace

NB_MODULE(mlxbastion_kernels, m) {
  m.doc() = "Vectorized quantized matrix-vector products for x86-64 CPUs.";
  m.def("quantized_matvec", &quantized_matvec, "x"_a, "w"_a, "scales"_a,
        "biases"_a, "group_size"_a, "bits"_a,
        "x @ dequantize(w, scales, biases).T in float32, for 2- to 8-bit "
        "affine-quantized w.");
}
