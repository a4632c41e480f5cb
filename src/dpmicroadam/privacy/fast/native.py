"""A small C kernel for per-example conv weight gradients, built on first use with ctypes.

:meth:`~dpmicroadam.privacy.fast.conv.ConvCall._patch_products` forms the per-example weight
gradients G_i = Σ_t e_{i,t} a_{i,t}ᵀ of an ungrouped conv on a channels-last input as a batched
matmul of the output gradients with the patches, which it must first copy out of a strided view
of the input. On the tanh CNN's first conv (one channel, 8x8 kernel, stride 2) that copy moves
the input in runs of 8 floats and costs as much as the matmul. Here a patch row's
kernel-width × channels entries are read where they lie (contiguous in a channels-last input)
and the products are summed in registers, tile by tile: nothing is copied.

The same library holds :func:`shift_gram`, the pixel ghost norm's sum of the pixel Gram matrix
over the kernel offsets (:func:`~dpmicroadam.privacy.fast.conv._pixel_gram`), and
:func:`bias_grads`, a conv's per-example bias gradients and their squared norms, under the same
conditions (one torch thread, float32 on the CPU, a compiler).

The kernel is plain C with GCC/Clang vector extensions (AVX2 with FMA where torch reports AVX2
or better on an x86 CPU, the platform's default vectors elsewhere), compiled by the system's C
compiler (``$CC``, ``cc``, ``gcc`` or ``clang``) in well under a second the first time and then
loaded from a cache keyed by the source, the flags and the compiler: ``$DPMICROADAM_CACHE``,
else ``$XDG_CACHE_HOME/dpmicroadam``, else ``~/.cache/dpmicroadam`` (where that cannot be
written, a private temporary folder of the process, removed once the library is loaded).
Without a compiler, or when building fails, :func:`conv2d_patch_products` returns None and the
caller takes the batched matmul: same results up to float rounding, only slower; :func:`status`
says which. ``DPMICROADAM_NATIVE=0`` (read at import; :data:`ENABLED` afterwards) turns the
kernel off.

One thread: the kernel runs only when torch runs one (``torch.get_num_threads() == 1``); with
more, the batched matmul runs on torch's threads. Threads of the kernel's own beside torch's
OpenMP pool ran slower: on the tanh CNN's first conv with 2 torch threads, 0.45 ms on 2 kernel
threads and 1.16 ms right after a torch matmul (whose OpenMP thread still spins on the second
core), against 0.54 and 0.82 ms on one (ad hoc).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ENV_SWITCH = "DPMICROADAM_NATIVE"
_FAILURE: list[str] = []

# Tiles: 4 output channels × 3 vectors of 8 patch entries summed in registers per pass over the
# positions (12 accumulators: enough independent sums to keep both FMA units busy), the vectors
# taken along a whole kernel-major patch row, across kernel rows; a row's last 1, 2 or 4 vectors
# by tiles of 1 or 2. The kernel needs P % 4 == 0 and KW·C % 8 == 0 (else the batched matmul).
OUT_TILE, ROW_VECTOR = 4, 8

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

typedef struct { /* the geometry a tile needs */
  i64 k, H, W, C, Ho, Wo, KH, KW, sh, sw;
  i64 en, eo, ey, ex; /* strides of e (elements): row, channel, output row, output column */
} job_t;

/* g[o0+o, 8(v0+j) .. +8] = sum over views and positions of e[pos, o0+o] * x[patch entries]
   for the tile's NJ vectors of 8 entries of a kernel-major patch row (vector v: kernel row
   v / (J/8), entries 8 (v % (J/8)) .. +8 of that row's KW x C, contiguous in the input);
   sq[o0+o] (if not NULL) += the squares of those entries */
#define TILE(OT, NJ)                                                                               \
static void tile_##OT##_##NJ(const job_t* t, const float* restrict xv,                             \
                             const float* restrict ev, float* restrict g, float* restrict sq,      \
                             i64 o0, i64 v0) {                                                     \
  const i64 W = t->W, C = t->C, Wo = t->Wo, sh = t->sh, sw = t->sw, eo = t->eo;                    \
  const i64 xs = t->H * W * C, J = t->KW * C, D = t->KH * J, per = J / 8;                          \
  i64 off[NJ];                                                                                     \
  for (int j = 0; j < NJ; j++) off[j] = ((v0 + j) / per) * W * C + ((v0 + j) % per) * 8;          \
  v8 acc[OT][NJ];                                                                                  \
  for (int o = 0; o < OT; o++)                                                                     \
    for (int j = 0; j < NJ; j++) acc[o][j] = (v8){0};                                              \
  for (i64 v = 0; v < t->k; v++) {                                                                 \
    const float* xb = xv + v * xs;                                                                 \
    const float* eb = ev + v * t->en + o0 * eo;                                                    \
    for (i64 y = 0; y < t->Ho; y++) {                                                              \
      const float* xr = xb + y * sh * W * C;                                                       \
      const float* er = eb + y * t->ey;                                                            \
      for (i64 q = 0; q < Wo; q++) {                                                               \
        const float* b = xr + q * sw * C;                                                          \
        const float* a = er + q * t->ex;                                                           \
        v8 bv[NJ];                                                                                 \
        for (int j = 0; j < NJ; j++) bv[j] = *(const v8u*)(b + off[j]);                            \
        for (int o = 0; o < OT; o++) {                                                             \
          /* spelled out so that the compiler broadcasts from memory (a load, not a shuffle) */    \
          const float av = a[o * eo];                                                              \
          const v8 s = {av, av, av, av, av, av, av, av};                                           \
          for (int j = 0; j < NJ; j++) acc[o][j] += s * bv[j];                                     \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  for (int o = 0; o < OT; o++)                                                                     \
    for (int j = 0; j < NJ; j++) *(v8u*)(g + (o0 + o) * D + 8 * (v0 + j)) = acc[o][j];             \
  if (sq)                                                                                          \
    for (int o = 0; o < OT; o++) {                                                                 \
      v8 s = acc[o][0] * acc[o][0];                                                                \
      for (int j = 1; j < NJ; j++) s += acc[o][j] * acc[o][j];                                     \
      sq[o0 + o] += ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));             \
    }                                                                                              \
}
TILE(4, 3)
TILE(4, 2)
TILE(4, 1)

/* sq: NULL, or (n, P) zeros that receive each example's squared norm per output channel.
   P % 4 == 0 and KW C % 8 == 0. A row's D / 8 vectors are taken 3 at a time, the last 4 or 2
   as 2 + 2 or 2, a single one alone. x: (n k, H, W, C) unpadded; with zero padding (ph, pw),
   each example's k views are copied into a zeroed scratch grid of (H + 2 ph) x (W + 2 pw)
   pixels just before its tiles read them (cache-hot), instead of a padded copy of the whole
   batch beforehand. Returns 0, or 1 if the scratch grid could not be allocated (nothing
   written). */
int dpm_conv2d_patch_products(const float* x, const float* e, float* g, float* sq, i64 n,
                              i64 k, i64 H, i64 W, i64 C, i64 Ho, i64 Wo, i64 P, i64 KH,
                              i64 KW, i64 sh, i64 sw, i64 en, i64 eo, i64 ey, i64 ex, i64 ph,
                              i64 pw) {
  const i64 Hp = H + 2 * ph, Wp = W + 2 * pw;
  const job_t t = {k, Hp, Wp, C, Ho, Wo, KH, KW, sh, sw, en, eo, ey, ex};
  const i64 D = KH * KW * C, V = D / 8, xs = H * W * C, ps = Hp * Wp * C;
  float* pad = NULL;
  if (ph || pw) {
    pad = calloc((size_t)(k * ps), sizeof(float)); /* the borders stay zero */
    if (!pad) return 1;
  }
  for (i64 i = 0; i < n; i++) {
    const float* xv = x + i * k * xs;
    if (pad) {
      for (i64 v = 0; v < k; v++)
        for (i64 r = 0; r < H; r++)
          memcpy(pad + v * ps + ((r + ph) * Wp + pw) * C, xv + v * xs + r * W * C,
                 (size_t)(W * C) * sizeof(float));
      xv = pad;
    }
    const float* ev = e + i * k * en;
    float* gi = g + i * P * D;
    float* sqi = sq ? sq + i * P : NULL;
    for (i64 o0 = 0; o0 < P; o0 += 4)
      for (i64 v0 = 0; v0 < V;) {
        const i64 left = V - v0;
        if (left == 1) {
          tile_4_1(&t, xv, ev, gi, sqi, o0, v0);
          v0 += 1;
        } else if (left == 2 || left == 4) {
          tile_4_2(&t, xv, ev, gi, sqi, o0, v0);
          v0 += 2;
        } else {
          tile_4_3(&t, xv, ev, gi, sqi, o0, v0);
          v0 += 3;
        }
      }
  }
  free(pad);
  return 0;
}

/* The bias gradients of a conv, per example: gb[i, o] = the sum over example i's k views and
   their Ho x Wo positions of e (any strides: en, eo, ey, ex), position by position, all
   channels at once (vectors along o where eo == 1); add[i] (if not NULL) += sum_o gb[i, o]^2. */
void dpm_bias_grads(const float* restrict e, float* restrict gb, float* restrict add, i64 n,
                    i64 k, i64 P, i64 Ho, i64 Wo, i64 en, i64 eo, i64 ey, i64 ex) {
  for (i64 i = 0; i < n; i++) {
    float* restrict g = gb + i * P;
    for (i64 o = 0; o < P; o++) g[o] = 0.0f;
    for (i64 v = 0; v < k; v++)
      for (i64 y = 0; y < Ho; y++)
        for (i64 x = 0; x < Wo; x++) {
          const float* restrict p = e + (i * k + v) * en + y * ey + x * ex;
          if (eo == 1)
            for (i64 o = 0; o < P; o++) g[o] += p[o];
          else
            for (i64 o = 0; o < P; o++) g[o] += p[o * eo];
        }
    if (add) {
      float s = 0.0f;
      for (i64 o = 0; o < P; o++) s += g[o] * g[o];
      add[i] += s;
    }
  }
}

/* The patches' Gram matrix from the pixels' one, per block b (example and group):
   G[b, s, t] = sum over kernel offsets (i, j) of P[b, px(s, i, j), px(t, i, j)], positions
   s = (view, y, x) over k views of Ho x Wo outputs, px(s, i, j) = (view, y sh + i dh, x sw + j dw)
   in a view's Hp x Wp padded pixels. P: (nb, k Hp Wp, k Hp Wp), G: (nb, k Ho Wo, k Ho Wo), both
   contiguous. Each output row is summed where it lies (one example's P stays in cache). */
static void shift_row(float* restrict g, const float* restrict p, i64 Wo, i64 sw) {
  if (sw == 1)
    for (i64 q = 0; q < Wo; q++) g[q] += p[q];
  else
    for (i64 q = 0; q < Wo; q++) g[q] += p[q * sw];
}

void dpm_shift_gram(const float* P, float* G, i64 nb, i64 k, i64 Hp, i64 Wp, i64 Ho, i64 Wo,
                    i64 KH, i64 KW, i64 sh, i64 sw, i64 dh, i64 dw) {
  const i64 A = Hp * Wp, NP = k * A, T = k * Ho * Wo;
  for (i64 b = 0; b < nb; b++) {
    const float* Pb = P + b * NP * NP;
    for (i64 s = 0; s < T; s++) {
      const i64 v1 = s / (Ho * Wo), y1 = (s / Wo) % Ho, x1 = s % Wo;
      float* g = G + (b * T + s) * T;
      for (i64 t = 0; t < T; t++) g[t] = 0.0f;
      for (i64 i = 0; i < KH; i++)
        for (i64 j = 0; j < KW; j++) {
          const float* row = Pb + (v1 * A + (y1 * sh + i * dh) * Wp + x1 * sw + j * dw) * NP;
          for (i64 v2 = 0; v2 < k; v2++)
            for (i64 y2 = 0; y2 < Ho; y2++)
              shift_row(g + (v2 * Ho + y2) * Wo, row + v2 * A + (y2 * sh + i * dh) * Wp + j * dw,
                        Wo, sw);
        }
    }
  }
}
"""


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("DPMICROADAM_CACHE"):
        return Path(os.environ["DPMICROADAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpmicroadam"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _flags() -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


def _build() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    flags = ["-O3", "-shared", "-fPIC", *_flags()]
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags, platform.machine()]).encode())
    folder, private = cache_dir(), False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError:
        # Not in a shared temporary folder, where another user could plant a library under the
        # expected name: a private folder of this process (built afresh each time).
        folder, private = Path(tempfile.mkdtemp(prefix="dpmicroadam-")), True
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = folder / f"conv_kernel_{key.hexdigest()[:16]}{suffix}"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "conv_kernel.c"
            src.write_text(SOURCE)
            built = Path(tmp) / target.name
            done = subprocess.run(
                [cc, *flags, str(src), "-o", str(built)], capture_output=True, text=True
            )
            if done.returncode != 0:
                first = (done.stderr or done.stdout).strip().splitlines()[:1]
                raise RuntimeError(f"{cc} failed: {first[0] if first else done.returncode}")
            os.replace(built, target)  # atomic: concurrent builders leave one whole file
    lib = ctypes.CDLL(str(target))
    if private:  # loaded: the folder is not needed any more (POSIX keeps the mapping)
        shutil.rmtree(folder, ignore_errors=True)
    fn = lib.dpm_conv2d_patch_products
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 18
    fn = lib.dpm_bias_grads
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 9
    fn = lib.dpm_shift_gram
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 12
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return _build()
    except Exception as err:  # no compiler, a failed build or load: the batched matmul runs
        _FAILURE.append(f"{type(err).__name__}: {err}".splitlines()[0][:500])
        return None


def _switch() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# Read once, at import (a lookup per conv call showed in profiles); set it to switch at run time.
ENABLED = _switch()


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel may run on input ``x`` now: enabled, one torch thread, float32 on
    the CPU (a cheap check before any input is prepared for it)."""
    return (
        ENABLED
        and torch.get_num_threads() == 1
        and x.dtype == torch.float32
        and x.device.type == "cpu"
    )


def status() -> str:
    """``"built"``, ``"off"`` (``DPMICROADAM_NATIVE=0``), ``"unbuilt"`` or why it failed."""
    if not ENABLED:
        return "off"
    if _FAILURE:
        return f"failed: {_FAILURE[0]}"
    return "built" if _library.cache_info().currsize else "unbuilt"


def channels_innermost(x: torch.Tensor) -> bool:
    """Whether a (N, C, *spatial) tensor holds its channels innermost, contiguously: what
    ``x.movedim(1, -1).is_contiguous()`` says, from the sizes and strides alone (the view and
    the check cost a few microseconds a call, a dozen times a step)."""
    size, stride = x.shape, x.stride()
    if len(size) < 2:
        return False
    if 0 in size:
        return True  # as torch: an empty tensor is contiguous
    expected = 1
    for d in (1, *range(len(size) - 1, 1, -1), 0):  # C, then the spatial dimensions, then N
        if size[d] != 1:
            if stride[d] != expected:
                return False
            expected *= size[d]
    return True


def takes(out_channels: int, row: int) -> bool:
    """Whether the kernel's tiles fit a layer of ``out_channels`` outputs and patch rows of
    ``row`` = kernel width × channels entries (a multiple of 4 and of 8)."""
    return out_channels > 0 and row > 0 and not out_channels % OUT_TILE and not row % ROW_VECTOR


def conv2d_patch_products(
    x: torch.Tensor,
    e: torch.Tensor,
    n: int,
    k: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    sq: torch.Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
) -> torch.Tensor | None:
    """Per-example weight gradients (n, P, KH·KW·C), rows kernel-major (kernel row, kernel
    column, channel), of an ungrouped 2-d conv with dilation 1; None where the kernel does not
    apply or is not available, or torch runs more than one thread (nothing was computed: take
    the batched matmul).

    Args:
        x: The input (n·k, C, H, W), channels-last; float32 on the CPU; zero-padded by
            ``padding`` in the kernel.
        e: Output gradients (n·k, P, Ho, Wo); float32 on the CPU, any strides (read where
            they lie: each is broadcast, so no layout is faster enough to pay a copy).
        n: Examples; rows i·k .. i·k+k−1 of ``x`` and ``e`` are example i's views, summed.
        k: Views per example.
        kernel: (KH, KW).
        stride: (sh, sw).
        sq: Optional (n, P) float32 zeros, contiguous, on the CPU: the kernel adds each row's
            squared norm to it as it writes the row (sums of squares of the entries it holds
            in registers, so the rows need no second pass). Left untouched when None is
            returned.
        padding: (ph, pw) zeros on each side of the input's rows and columns, added by the
            kernel example by example as it goes: on the tanh CNN's first conv (padding 3,
            64 examples, 1 thread) a padded copy of the batch took 150 µs inside the engine's
            call (its input no longer in cache), against 27 µs on its own.
    """
    if sq is not None and (
        sq.dim() != 2 or sq.shape[0] != n or e.dim() < 2 or sq.shape[1] != e.shape[1]
        or sq.dtype != torch.float32 or not sq.is_contiguous() or sq.device.type != "cpu"
    ):  # fmt: skip
        raise ValueError(
            f"sq must be zeros of shape (n, P) = ({n}, {e.shape[1] if e.dim() > 1 else '?'}), "
            f"float32, contiguous, on the CPU; got {tuple(sq.shape)} {sq.dtype} on {sq.device}"
        )
    if not usable(x):
        return None
    if e.dtype != torch.float32 or e.device.type != "cpu" or x.dim() != 4 or e.dim() != 4:
        return None
    rows, channels, height, width = x.shape
    out_channels, out_h, out_w = e.shape[1:]
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    if not takes(out_channels, kw * channels) or rows != n * k or e.shape[0] != rows or n == 0:
        return None
    # every patch must lie inside the padded input
    if (
        min(ph, pw) < 0
        or (out_h - 1) * sh + kh > height + 2 * ph
        or (out_w - 1) * sw + kw > width + 2 * pw
    ):
        return None
    if not channels_innermost(x):
        return None
    lib = _library()
    if lib is None:
        return None
    out = x.new_empty((n, out_channels, kh * kw * channels))
    failed = lib.dpm_conv2d_patch_products(
        x.data_ptr(), e.data_ptr(), out.data_ptr(), None if sq is None else sq.data_ptr(),
        n, k, height, width, channels,
        out_h, out_w, out_channels, kh, kw, sh, sw, *e.stride(), ph, pw,
    )  # fmt: skip
    if failed:
        raise MemoryError(
            f"the conv kernel could not allocate its padded grid ({k} x {height + 2 * ph} x "
            f"{width + 2 * pw} x {channels} floats)"
        )
    return out


def bias_grads(e: torch.Tensor, n: int, k: int, add: torch.Tensor | None = None):
    """Per-example bias gradients (n, P) of a conv from its output gradients, and their squared
    norms added to ``add`` in place; None where the kernel does not apply or is not available
    (nothing was computed or added: take ``e.reshape(n, k, P, -1).sum((1, 3))``).

    On the tanh CNN (64 examples, 1 thread, inside the engine's call) this replaces four torch
    calls a conv layer (the reshape, the sum, the square and its sum) and the addition of the
    bias's part to the weight's.

    Args:
        e: Output gradients (n·k, P, L) or (n·k, P, H, W); float32 on the CPU, any strides.
        n: Examples; rows i·k .. i·k+k−1 are example i's views, summed.
        k: Views per example.
        add: Optional (n,) float32 contiguous tensor on the CPU that receives Σ_o gb[i, o]².
    """
    if not usable(e) or e.dim() not in (3, 4) or e.shape[0] != n * k or n == 0:
        return None
    if add is not None and (
        add.shape != (n,) or add.dtype != torch.float32 or not add.is_contiguous()
        or add.device.type != "cpu"
    ):  # fmt: skip
        raise ValueError(
            f"add must be a contiguous float32 CPU tensor of shape ({n},), got "
            f"{tuple(add.shape)} {add.dtype} on {add.device}"
        )
    lib = _library()
    if lib is None:
        return None
    channels = e.shape[1]
    if e.dim() == 3:  # (n·k, P, L): one row of L positions
        spatial, strides = (1, e.shape[2]), (0, e.stride(2))
    else:
        spatial, strides = tuple(e.shape[2:]), e.stride()[2:]
    out = e.new_empty((n, channels))
    lib.dpm_bias_grads(
        e.data_ptr(), out.data_ptr(), None if add is None else add.data_ptr(), n, k, channels,
        *spatial, e.stride(0), e.stride(1), *strides,
    )  # fmt: skip
    return out


def shift_gram(
    pixel_gram: torch.Tensor,
    k: int,
    pixels: tuple[int, int],
    out: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor | None:
    """The patches' Gram matrices (nb, k·Ho·Wo, k·Ho·Wo) of a 2-d conv from its padded input
    pixels' Gram matrices ``pixel_gram`` (nb, k·Hp·Wp, k·Hp·Wp): entry (s, t) is the sum over
    kernel offsets δ of the pixel Gram entry at the pixels patches s and t read at δ. None
    where the kernel does not apply or is not available (nothing was computed).

    Args:
        pixel_gram: Contiguous, float32 on the CPU; block b holds one example's (and group's)
            k views' pixels, view by view, each row by row.
        k: Views per example.
        pixels: (Hp, Wp) padded input size; out: (Ho, Wo) output size.
        kernel, stride, dilation: The conv's, 2-d.
    """
    if not usable(pixel_gram) or pixel_gram.dim() != 3 or not pixel_gram.is_contiguous():
        return None
    (hp, wp), (ho, wo), (kh, kw) = pixels, out, kernel
    (sh, sw), (dh, dw) = stride, dilation
    nb, side = pixel_gram.shape[0], k * hp * wp
    if pixel_gram.shape[1:] != (side, side) or min(ho, wo, kh, kw) < 1:
        return None
    if (ho - 1) * sh + (kh - 1) * dh >= hp or (wo - 1) * sw + (kw - 1) * dw >= wp:
        return None  # a patch would read outside the pixels
    lib = _library()
    if lib is None:
        return None
    positions = k * ho * wo
    gram = pixel_gram.new_empty((nb, positions, positions))
    lib.dpm_shift_gram(
        pixel_gram.data_ptr(), gram.data_ptr(), nb, k, hp, wp, ho, wo, kh, kw, sh, sw, dh, dw
    )
    return gram
