"""``implementation="fused"``: the MicroAdam step of every eligible tensor as two C++ loops.

The eager step runs SPEC section 1 as ~150 ATen calls over a work buffer of the large tensors
(:mod:`dpmicroadam.optim.packed`), each a pass over memory, and steps the small ones with ~40
calls more (:mod:`dpmicroadam.optim.batched`), mostly Python. Here each top-k block of each
tensor (32768 entries by default; a small tensor is one block) is one work item of two
OpenMP-parallel C++ loops (``at::parallel_for``), over the tensors' own state, with no work
buffer, in one call for all of a group's tensors:

* ``front`` (steps 1-3): decode the 4-bit error feedback and add the gradient, select the top-k
  by magnitude, zero the selection and quantize again, into new error-feedback tensors and a new
  window slot. Nothing of the state is written, so a non-finite value (a NaN or infinite
  gradient, or an overflow: either ranks above every finite magnitude, so it is selected and
  seen) raises with the state untouched, as on every path;
* ``update`` (steps 4-6): weight decay, the window moments at the block's window coordinates
  (summed slot by slot, in slot order, so no result depends on threads) and the sparse update,
  once per coordinate.

The selection is exact: a threshold is taken from a strided sample of 512 of the block's
magnitudes, the entries at or above it are the candidates, and ``std::nth_element`` picks the
``k`` largest among them (all entries are candidates when fewer than ``k`` pass). Ties at the
k-th magnitude may be broken differently from ``torch.topk``, which is as valid (SPEC's top-k is
a set); the order of the selection inside a window slot differs, which changes no result. The
arithmetic of every other step is the eager path's, operation by operation (compiled with
``-ffp-contract=off``, so nothing is fused into an FMA), except that ``std::sqrt`` is correctly
rounded where torch's float32 CPU square root can be one unit in the last place off: the error
feedback and the window agree bit for bit with the eager path where the selection does, the
parameters to rounding.

Eligible (:func:`eligible`): CPU float32 parameters and gradients, 4-bit error feedback rounded to
nearest, int16 window indices, blocks that start at a quantization bucket, window values in
bfloat16 or float32. Other tensors take the eager paths in the same step. When the extension
cannot be built (no C++ compiler or ``ninja``) a warning is issued once and every tensor takes
the eager paths. The C++ is one file against ATen's and ``torch/library.h``'s headers, its two
functions registered as operators (``torch.ops.<name>``), with no Python bindings: building it
takes ~16 s the first time on a machine (this project's; 61 s when it went through
``load_inline``, whose ``torch/extension.h`` alone took 51 s to compile), then PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``) serves it. The C++ checks every tensor's dtype, size
and layout before reading it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._fallback import give_up
from .kernels import Hyper, bias_corrections, moment_weights, raise_overflow, step_size
from .quantize import num_buckets, packed_numel
from .topk import BlockLayout, keep_count

NAME = "dpmicroadam_fused_v9"
_FAILURE: list[str] = []
_SECONDS: list[float] = []

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Item { int64_t member, start, len, k, col; };

std::vector<Item> items(at::IntArrayRef numels, at::IntArrayRef blocks, int64_t k_full,
                        at::IntArrayRef k_tails) {
  std::vector<Item> out;
  for (int64_t m = 0; m < (int64_t)numels.size(); ++m) {
    const int64_t block = blocks[m];  // a tensor of at most one block is its own tail
    int64_t n_full = numels[m] > block ? numels[m] / block : 0;
    int64_t tail = numels[m] - n_full * block;
    for (int64_t b = 0; b < n_full; ++b) out.push_back({m, b * block, block, k_full, b * k_full});
    if (tail) out.push_back({m, n_full * block, tail, k_tails[m], n_full * k_full});
  }
  return out;
}

inline uint32_t mag_bits(float x) {
  float a = std::fabs(x);
  uint32_t u;
  std::memcpy(&u, &a, 4);
  return u;  // monotone in |x| for finite values; inf and NaN above all
}

// Positions of the k largest u (any order; ties broken arbitrarily): candidates at or above a
// threshold from a strided sample, then nth_element among them.
void select_top(const uint32_t* u, int64_t n, int64_t k, std::vector<uint64_t>& cand,
                std::vector<uint32_t>& sample) {
  cand.clear();
  uint32_t t = 0;  // threshold: every entry is a candidate
  if (k < n) {
    int64_t s = std::min<int64_t>(n, 512);
    int64_t stride = n / s;
    sample.resize(s);
    for (int64_t i = 0; i < s; ++i) sample[i] = u[i * stride];
    // about 2.5 k candidates expected; fewer than k is rare and falls back to all entries
    int64_t r = std::min<int64_t>(s - 1, (5 * k * s + 2 * n - 1) / (2 * n));
    std::nth_element(sample.begin(), sample.begin() + r, sample.end(), std::greater<uint32_t>());
    t = sample[r];
  }
  for (int pass = 0; pass < 2; ++pass) {
    // (magnitude bits, position) pairs of the entries at or above t, 8 entries at a time
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      unsigned mask = 0;
      for (int b = 0; b < 8; ++b) mask |= (unsigned)(u[j + b] >= t) << b;
      while (mask) {
        const int b = __builtin_ctz(mask);
        cand.push_back(((uint64_t)u[j + b] << 32) | (uint64_t)(j + b));
        mask &= mask - 1;
      }
    }
    for (; j < n; ++j)
      if (u[j] >= t) cand.push_back(((uint64_t)u[j] << 32) | (uint64_t)j);
    if ((int64_t)cand.size() >= k) break;
    cand.clear();
    t = 0;
  }
  if ((int64_t)cand.size() > k)  // the k largest magnitudes (ties: the later position first)
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<uint64_t>());
}

// Min and max of a bucket (finite values) in 8 independent lanes, so that they vectorize.
inline float bucket_min(const float* x, int64_t n) {
  float m[8];
  for (int t = 0; t < 8; ++t) m[t] = x[t % n];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) m[t] = x[j + t] < m[t] ? x[j + t] : m[t];  // NOLINT
  for (; j < n; ++j) m[0] = x[j] < m[0] ? x[j] : m[0];
  float r = m[0];
  for (int t = 1; t < 8; ++t) r = m[t] < r ? m[t] : r;
  return r;
}

inline float bucket_max(const float* x, int64_t n) {
  float m[8];
  for (int t = 0; t < 8; ++t) m[t] = x[t % n];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) m[t] = x[j + t] > m[t] ? x[j + t] : m[t];
  for (; j < n; ++j) m[0] = x[j] > m[0] ? x[j] : m[0];
  float r = m[0];
  for (int t = 1; t < 8; ++t) r = m[t] > r ? m[t] : r;
  return r;
}

template <typename V>
void front_impl(at::TensorList grads, at::TensorList codes, at::TensorList los,
                at::TensorList his, at::TensorList new_codes, at::TensorList new_los,
                at::TensorList new_his, at::TensorList sel_idx, at::TensorList sel_val,
                const std::vector<Item>& work, at::IntArrayRef numels, int64_t bucket,
                std::vector<uint8_t>& item_ok) {
  const int64_t full_bytes = (bucket + 1) / 2, half = full_bytes;
  at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a;
    std::vector<uint32_t> u, sample;
    std::vector<uint64_t> cand;
    std::vector<int32_t> low_codes(half);
    int32_t* low = low_codes.data();
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = work[w];
      const int64_t m = it.member, n = it.len;
      a.resize(n);
      u.resize(n);
      const float* g = grads[m].data_ptr<float>() + it.start;
      const uint8_t* cd = codes[m].data_ptr<uint8_t>();
      const float* lo = los[m].data_ptr<float>();
      const float* hi = his[m].data_ptr<float>();
      const int64_t numel = numels[m];
      // 1. a = dequant(e) + g, bucket by bucket (a bucket of L entries takes ceil(L / 2) bytes,
      //    byte j holding entry j in its low nibble and entry j + ceil(L / 2) in its high one)
      for (int64_t bq = it.start / bucket; bq * bucket < it.start + n; ++bq) {
        const int64_t len = std::min(bucket, numel - bq * bucket), h = (len + 1) / 2;
        const float l = lo[bq], step = (hi[bq] - l) / 15.0f;
        float* aq = a.data() + (bq * bucket - it.start);
        const uint8_t* cq = cd + bq * full_bytes;
        for (int64_t j = 0; j < h; ++j) aq[j] = (float)(cq[j] & 15) * step + l;
        for (int64_t j = 0; j < len - h; ++j) aq[j + h] = (float)(cq[j] >> 4) * step + l;
      }
      for (int64_t j = 0; j < n; ++j) {
        a[j] = a[j] + g[j];
        u[j] = mag_bits(a[j]);
      }
      // 2. top-k by |a|; the selection goes to the new slot's columns
      select_top(u.data(), n, it.k, cand, sample);
      int16_t* si = sel_idx[m].data_ptr<int16_t>() + it.col;
      V* sv = reinterpret_cast<V*>(sel_val[m].data_ptr()) + it.col;
      bool ok = true;
      for (int64_t r = 0; r < it.k; ++r) {
        const int32_t j = (int32_t)(cand[r] & 0xFFFFFFFFu);
        ok = ok && std::isfinite(a[j]);
        si[r] = (int16_t)j;
        sv[r] = V(a[j]);
        a[j] = 0.0f;
      }
      item_ok[w] = ok ? 1 : 0;
      // 3. e = quant(a), bucket by bucket
      uint8_t* nc = new_codes[m].data_ptr<uint8_t>();
      float* nlo = new_los[m].data_ptr<float>();
      float* nhi = new_his[m].data_ptr<float>();
      for (int64_t bq = it.start / bucket; bq * bucket < it.start + n; ++bq) {
        const int64_t len = std::min(bucket, numel - bq * bucket), h = (len + 1) / 2;
        const float* aq = a.data() + (bq * bucket - it.start);
        const float l = bucket_min(aq, len), hh = bucket_max(aq, len);
        float step = (hh - l) / 15.0f;
        if (!(step > 0.0f)) step = 1.0f;
        uint8_t* cq = nc + bq * full_bytes;
        // codes in vectorizable passes; the floor of a value >= 0.5 (x >= l) is its truncation
        for (int64_t j = 0; j < h; ++j) low[j] = (int32_t)((aq[j] - l) / step + 0.5f);
        for (int64_t j = 0; j < len - h; ++j)
          low[j] += 16 * (int32_t)((aq[j + h] - l) / step + 0.5f);
        for (int64_t j = 0; j < h; ++j) cq[j] = (uint8_t)low[j];
        nlo[bq] = l;
        nhi[bq] = hh;
      }
    }
  });
}

template <typename V>
void update_impl(at::TensorList params, at::TensorList indices, at::TensorList values,
                 const std::vector<Item>& work, at::IntArrayRef k_totals, int64_t filled,
                 const float* w1, const float* w2, float decay, bool decayed, float c2, float eps,
                 float step) {
  at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> big_m, big_s;
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = work[w];
      const int64_t m = it.member, kt = k_totals[m];
      float* p = params[m].data_ptr<float>() + it.start;
      if (decayed)
        for (int64_t j = 0; j < it.len; ++j) p[j] = p[j] * decay;
      big_m.resize(it.len);
      big_s.resize(it.len);
      const int16_t* idx = indices[m].data_ptr<int16_t>() + it.col;
      const V* val = reinterpret_cast<const V*>(values[m].data_ptr()) + it.col;
      for (int64_t i = 0; i < filled; ++i)
        for (int64_t r = 0; r < it.k; ++r) {
          const int64_t c = idx[i * kt + r];
          big_m[c] = 0.0f;
          big_s[c] = 0.0f;
        }
      // 4. M and S at the window's coordinates, slot by slot in slot order
      for (int64_t i = 0; i < filled; ++i)
        for (int64_t r = 0; r < it.k; ++r) {
          const int64_t c = idx[i * kt + r];
          const float v = (float)val[i * kt + r];
          big_m[c] = big_m[c] + v * w1[i];
          big_s[c] = big_s[c] + (v * v) * w2[i];
        }
      // 5-6. theta += step * M / (sqrt(c2 S) + eps), once per coordinate
      for (int64_t i = 0; i < filled; ++i)
        for (int64_t r = 0; r < it.k; ++r) {
          const int64_t c = idx[i * kt + r];
          if (big_s[c] < 0.0f) continue;  // done: S >= 0 otherwise
          const float denom = std::sqrt(big_s[c] * c2) + eps;
          p[c] = p[c] + step * big_m[c] / denom;
          big_s[c] = -1.0f;
        }
    }
  });
}

// Every tensor the loops read or write is checked here, so that a state that does not fit its
// parameter (a tampered checkpoint) raises instead of reading or writing out of bounds.
void expect(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what,
            size_t m) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.numel() == numel,
              "MicroAdam fused step: the ", what, " of tensor ", m, " should be a contiguous CPU ",
              dtype, " tensor of ", numel, " entries, got ", t.scalar_type(), " ", t.sizes());
}

void expect_window(const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols,
                   const char* what, size_t m) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.dim() == 2 && t.size(0) >= rows && t.size(1) == cols,
              "MicroAdam fused step: the ", what, " of tensor ", m, " should be a contiguous CPU ",
              dtype, " tensor of at least ", rows, " x ", cols, ", got ", t.scalar_type(), " ",
              t.sizes());
}

int64_t code_bytes(int64_t numel, int64_t bucket) {
  return (numel / bucket) * ((bucket + 1) / 2) + (numel % bucket + 1) / 2;
}

int64_t columns(int64_t numel, int64_t block, int64_t k_full, int64_t k_tail) {
  return (numel > block ? numel / block : 0) * k_full + k_tail;
}

}  // namespace

// finite[m]: 1, or 0 where member m's gradient plus error feedback is not finite
void front(at::TensorList grads, at::TensorList codes, at::TensorList los, at::TensorList his,
           at::TensorList new_codes, at::TensorList new_los, at::TensorList new_his,
           at::TensorList sel_idx, at::TensorList sel_val, at::Tensor finite,
           at::IntArrayRef numels, at::IntArrayRef blocks, int64_t bucket, int64_t k_full,
           at::IntArrayRef k_tails) {
  const size_t n = numels.size();
  TORCH_CHECK(grads.size() == n && codes.size() == n && los.size() == n && his.size() == n &&
                  new_codes.size() == n && new_los.size() == n && new_his.size() == n &&
                  sel_idx.size() == n && sel_val.size() == n && blocks.size() == n &&
                  k_tails.size() == n && n > 0 && bucket > 0,
              "MicroAdam fused step: argument lists of different lengths");
  const auto vdtype = sel_val[0].scalar_type();
  TORCH_CHECK(vdtype == at::kBFloat16 || vdtype == at::kFloat,
              "MicroAdam fused step: window values must be bfloat16 or float32");
  for (size_t m = 0; m < n; ++m) {
    const int64_t nb = (numels[m] + bucket - 1) / bucket, bytes = code_bytes(numels[m], bucket);
    const int64_t cols = columns(numels[m], blocks[m], k_full, k_tails[m]);
    TORCH_CHECK(blocks[m] > 0 && (numels[m] <= blocks[m] || blocks[m] % bucket == 0),
                "MicroAdam fused step: blocks must start at a bucket");
    expect(grads[m], at::kFloat, numels[m], "gradient", m);
    expect(codes[m], at::kByte, bytes, "error-feedback codes", m);
    expect(los[m], at::kFloat, nb, "bucket minima", m);
    expect(his[m], at::kFloat, nb, "bucket maxima", m);
    expect(new_codes[m], at::kByte, bytes, "new codes", m);
    expect(new_los[m], at::kFloat, nb, "new minima", m);
    expect(new_his[m], at::kFloat, nb, "new maxima", m);
    expect(sel_idx[m], at::kShort, cols, "new window indices", m);
    expect(sel_val[m], vdtype, cols, "new window values", m);
  }
  expect(finite, at::kByte, (int64_t)n, "finiteness flags", 0);
  auto work = items(numels, blocks, k_full, k_tails);
  std::vector<uint8_t> item_ok(work.size(), 1);
  if (sel_val[0].scalar_type() == at::kBFloat16)
    front_impl<c10::BFloat16>(grads, codes, los, his, new_codes, new_los, new_his, sel_idx, sel_val,
                              work, numels, bucket, item_ok);
  else
    front_impl<float>(grads, codes, los, his, new_codes, new_los, new_his, sel_idx, sel_val, work,
                      numels, bucket, item_ok);
  uint8_t* f = finite.data_ptr<uint8_t>();
  std::fill(f, f + n, 1);
  for (size_t w = 0; w < work.size(); ++w)
    if (!item_ok[w]) f[work[w].member] = 0;
}

void update(at::TensorList params, at::TensorList indices, at::TensorList values,
            at::IntArrayRef numels, at::IntArrayRef blocks, int64_t k_full,
            at::IntArrayRef k_tails, at::IntArrayRef k_totals, at::Tensor w1, at::Tensor w2,
            double decay, bool decayed, double c2, double eps, double step) {
  const size_t n = numels.size();
  TORCH_CHECK(params.size() == n && indices.size() == n && values.size() == n &&
                  blocks.size() == n && k_tails.size() == n && k_totals.size() == n && n > 0,
              "MicroAdam fused step: argument lists of different lengths");
  const int64_t rows = w1.numel();
  expect(w1, at::kFloat, rows, "moment weights", 0);
  expect(w2, at::kFloat, rows, "moment weights", 0);
  const auto vdtype = values[0].scalar_type();
  TORCH_CHECK(vdtype == at::kBFloat16 || vdtype == at::kFloat,
              "MicroAdam fused step: window values must be bfloat16 or float32");
  for (size_t m = 0; m < n; ++m) {
    const int64_t cols = columns(numels[m], blocks[m], k_full, k_tails[m]);
    TORCH_CHECK(k_totals[m] == cols, "MicroAdam fused step: window columns do not match");
    expect(params[m], at::kFloat, numels[m], "parameter", m);
    expect_window(indices[m], at::kShort, rows, cols, "window indices", m);
    expect_window(values[m], vdtype, rows, cols, "window values", m);
  }
  auto work = items(numels, blocks, k_full, k_tails);
  const float* a1 = w1.data_ptr<float>();
  const float* a2 = w2.data_ptr<float>();
  const int64_t filled = w1.numel();
  if (values[0].scalar_type() == at::kBFloat16)
    update_impl<c10::BFloat16>(params, indices, values, work, k_totals, filled, a1, a2,
                               (float)decay, decayed, (float)c2, (float)eps, (float)step);
  else
    update_impl<float>(params, indices, values, work, k_totals, filled, a1, a2, (float)decay,
                       decayed, (float)c2, (float)eps, (float)step);
}

// torch.ops.<NAME>.front and .update (the namespace is given as -DDPM_NAMESPACE=<NAME>)
TORCH_LIBRARY(DPM_NAMESPACE, m) {
  m.def("front", &front);
  m.def("update", &update);
}
"""


def build_failure() -> str | None:
    """Why building the extension failed in this process, or None."""
    return _FAILURE[0] if _FAILURE else None


def build_seconds() -> float:
    """Seconds spent building or loading the extension in this process (0 before the first)."""
    return sum(_SECONDS)


def instruction_set() -> tuple[str, list[str]]:
    """(name, compiler flags) of the vector instructions the build may use: AVX2 where torch
    reports AVX2 or AVX-512 on this CPU, else the compiler's default for the platform. The name
    is part of the extension's, so machines sharing a cache do not share a build."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2"]
    return "default", []


def _find_ninja() -> None:
    """Put the ``ninja`` of the ``ninja`` package on PATH if none is there (a virtual
    environment used without activating it), as torch's extension builder looks it up there."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _extension():
    """``torch.ops.<name>``: the two operators, built (or loaded from torch's extension cache)
    on the first call; None where building failed."""
    from torch.utils import cpp_extension

    _find_ninja()
    start = time.perf_counter()
    target, extra = instruction_set()
    try:
        # one build per torch installation: environments that share the extension cache do
        # not rebuild each other's (torch keys a build by its name and rebuilds on any change)
        where = hashlib.sha256(f"{torch.__file__}|{torch.__version__}".encode()).hexdigest()[:10]
        name = f"{NAME}_{target}_{where}"
        # a file of its own, where load_inline would write one, rather than load_inline, whose
        # prelude (torch/extension.h, for Python bindings not needed here) took 51 of 61 s
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))  # noqa: SLF001
        source = folder / "step.cpp"
        if not source.exists() or source.read_text() != SOURCE:  # else ninja would rebuild
            partial = folder / f"step.cpp.{os.getpid()}"
            partial.write_text(SOURCE)
            os.replace(partial, source)  # whole, with processes building side by side
        cpp_extension.load(
            name,
            sources=[str(source)],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", f"-DDPM_NAMESPACE={name}"]
            + extra,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = getattr(torch.ops, name)
    except Exception as err:  # no compiler, no ninja, a build error: the eager step runs
        give_up(
            _FAILURE, err,
            "MicroAdam(implementation='fused'): building the C++ step failed ({reason}); "
            "running the eager packed step from now on.",
            stacklevel=4,
        )  # fmt: skip
        return None
    finally:
        _SECONDS.append(time.perf_counter() - start)
    return ops


def available() -> bool:
    """Whether the C++ step is built (building it on the first call)."""
    return not _FAILURE and _extension() is not None


def eligible(p: Tensor, hp: Hyper, layout: BlockLayout) -> bool:
    """Whether ``p`` (split into top-k blocks as ``layout``) can take the fused step (see the
    module docstring); builds the extension on the first eligible tensor and is False from then
    on if that fails."""
    block = hp.topk_block_size
    if (
        p.device.type != "cpu"
        or p.dtype != torch.float32
        or not p.is_contiguous()
        or p.grad is None
        or p.grad.dtype != torch.float32
        or not p.grad.is_contiguous()
        or hp.ef_bits != 4
        or hp.ef_rounding != "nearest"
        or block is None
        or hp.value_dtype not in (torch.bfloat16, torch.float32)
    ):
        return False
    if layout.index_dtype != torch.int16:
        return False
    if layout.n_full and block % hp.quant_bucket_size:
        return False  # every block must start at a bucket
    return available()


@functools.lru_cache(maxsize=64)
def _sizes(numels: tuple[int, ...], block: int, bucket: int, density: float) -> tuple:
    """Per-member (code bytes, buckets, window columns) and the keeps of tail blocks."""
    k_full = keep_count(density, block)
    k_tails, code_bytes, buckets, columns = [], [], [], []
    for n in numels:
        n_full, tail = divmod(n, block) if n > block else (0, n)
        k_tails.append(keep_count(density, tail) if tail else 0)
        code_bytes.append(packed_numel(n, 4, bucket))
        buckets.append(num_buckets(n, bucket))
        columns.append(n_full * k_full + k_tails[-1])
    # a tensor of exactly one block is its own tail block (as make_layout has it)
    blocks = [block if n > block else max(n, 1) for n in numels]
    return k_full, k_tails, code_bytes, buckets, columns, blocks


@dataclass
class Front:
    """What :func:`front` computed for one group of tensors, for :func:`finish`."""

    params: list[Tensor]
    states: list[dict[str, Tensor]]
    hp: Hyper
    t: int
    numels: list[int]
    sizes: tuple  # from _sizes
    new: tuple  # (codes, lo, hi, selected indices, selected values), a view per member


def front(names: list, params: list[Tensor], states: list[dict[str, Tensor]], hp: Hyper) -> Front:
    """SPEC steps 1-3 for tensors of one device, dtype and step count, all :func:`eligible`,
    into new tensors: the state is not touched.

    Raises:
        ValueError: naming the first tensor whose gradient holds NaN or inf, or whose gradient
            plus error feedback overflowed (every non-finite entry ranks above the finite ones,
            so it is selected and seen).
    """
    ext = _extension()
    numels = tuple(p.numel() for p in params)
    sizes = _sizes(numels, hp.topk_block_size, hp.quant_bucket_size, hp.density)
    k_full, k_tails, code_bytes, buckets, columns, blocks = sizes
    # the new error feedback and window slot: one buffer each, a view per member
    new = (
        torch.empty(sum(code_bytes), dtype=torch.uint8).split(code_bytes),
        torch.empty(sum(buckets)).split(buckets),
        torch.empty(sum(buckets)).split(buckets),
        torch.empty(sum(columns), dtype=torch.int16).split(columns),
        torch.empty(sum(columns), dtype=hp.value_dtype).split(columns),
    )
    finite = torch.empty(len(params), dtype=torch.uint8)
    ext.front(
        [p.grad.view(-1) for p in params], [st["ef_codes"] for st in states],
        [st["ef_min"] for st in states], [st["ef_max"] for st in states], *new, finite,
        list(numels), blocks, hp.quant_bucket_size, k_full, k_tails,
    )  # fmt: skip
    if not bool(finite.all()):
        bad = int((finite == 0).nonzero()[0])
        if not bool(torch.isfinite(params[bad].grad).all()):
            raise ValueError(
                f"MicroAdam: the gradient of {names[bad]} contains NaN or inf; no state was "
                "changed. Skip this step (e.g. a GradScaler does) or find the overflow."
            )
        raise_overflow(names[bad])
    return Front(params, states, hp, int(states[0]["step"]) + 1, list(numels), sizes, new)


def finish(f: Front) -> None:
    """Store what :func:`front` computed, then SPEC steps 4-6 into the parameters."""
    ext = _extension()
    states, hp, t = f.states, f.hp, f.t
    k_full, k_tails, _, _, columns, blocks = f.sizes
    slot = (t - 1) % hp.window_size
    codes, los, his, sel_idx, sel_val = f.new
    for st, c, lo, hi in zip(states, codes, los, his):
        st["ef_codes"], st["ef_min"], st["ef_max"] = c, lo, hi
    torch._foreach_copy_([st["indices"][slot] for st in states], sel_idx)
    torch._foreach_copy_([st["values"][slot] for st in states], sel_val)
    torch._foreach_add_([st["step"] for st in states], 1)
    filled = min(t, hp.window_size)
    w1, w2 = moment_weights(hp, t, filled, torch.float32, f.params[0].device)
    ext.update(
        [p.view(-1) for p in f.params], [st["indices"] for st in states],
        [st["values"] for st in states], f.numels, blocks, k_full, k_tails,
        columns, w1.reshape(-1).contiguous(), w2.reshape(-1).contiguous(),
        1 - hp.lr * hp.weight_decay, hp.weight_decay != 0, bias_corrections(hp, t)[1], hp.eps,
        step_size(hp, t),
    )  # fmt: skip
