"""Hadamard matrices and fast orthogonal Hadamard transforms (QuaRot, arXiv:2404.00456;
SpinQuant, arXiv:2405.16406): rotating a layer's inputs by an orthogonal ``Q`` and its weight's
input columns by the same ``Q`` leaves ``x W^T = (x Q)(W Q)^T`` unchanged while spreading
outliers over every channel, which makes both easier to quantize.

- ``fwht(x)``: ``x H_n / sqrt(n)`` over the last dimension, ``n`` a power of two (Sylvester
  ``H_n``), O(n log n) on the ``qkern::fwht`` kernel; its own inverse.
- ``hadamard_matrix(n)``: a dense ``n x n`` Hadamard matrix (entries +-1, ``H H^T = n I``) for
  ``n = 2^k m`` with ``m = 1`` (Sylvester) or ``m`` a Paley order: ``m = q + 1`` with ``q`` a
  prime power, ``q = 3 (mod 4)`` (Paley I), or ``m = 2 (q + 1)`` with ``q = 1 (mod 4)``
  (Paley II); ``H_n = H_{2^k} (x) H_m`` (Kronecker). ``m`` is the smallest such factor of ``n``
  (``supported_sizes`` lists them; e.g. ``14336 = 2^9 x 28``, ``11008 = 2^5 x 344`` with
  ``344 = 7^3 + 1``, ``13824 = 2^7 x 108``). Sizes that need other constructions (Williamson
  and others: ``n = 2^k x 92``, ``116``, ``156``, ``172``, ...) raise ValueError.
- ``random_hadamard(n, seed)``: ``Q = H_n diag(s) / sqrt(n)`` with random signs ``s``
  (``random_signs``): orthogonal.
- ``hadamard_transform(x, signs)``: ``x Q`` without forming ``Q``: the FWHT over the ``2^k``
  factor, a dense ``m x m`` product over the other, then the signs.
"""

from __future__ import annotations

import functools
import math

import torch

from . import ops  # noqa: F401  (registers qkern::fwht)

__all__ = ["base_order", "fwht", "hadamard_matrix", "hadamard_transform", "random_hadamard",
           "random_signs", "supported_sizes"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_x(what: str, x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{what}: x must be float32, bfloat16 or float16 (the kernel computes "
                        f"in float32), got {x.dtype}; use hadamard_matrix(n) for a float64 "
                        "product")
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension")
    return x.shape[-1]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x H_n / sqrt(n)`` over the last dimension (any leading dimensions), ``n`` a power of
    two; ``x``'s dtype out. Differentiable (the transform is symmetric and orthogonal, so its
    backward is itself)."""
    n = _check_x("fwht", x)
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the last dimension must be a power of two (1, 2, 4, ...), got "
                         f"{n}; hadamard_transform takes n = 2^k m (see supported_sizes)")
    return torch.ops.qkern.fwht(x)


# ---- Paley constructions over GF(q), q = p^e (e <= 3) --------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime and e <= 3; else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 and e <= 3 else None


def _irreducible(p: int, e: int) -> list[int]:
    """A monic polynomial of degree e <= 3 over GF(p) without roots (hence irreducible), as its
    low coefficients [c_0 .. c_{e-1}] of x^e + ... + c_0."""
    if e == 1:
        return [0]
    for code in range(p ** e):
        cs = [(code // p ** i) % p for i in range(e)]
        if all((pow(a, e, p) + sum(c * pow(a, i, p) for i, c in enumerate(cs))) % p
               for a in range(p)):
            return cs
    raise AssertionError("unreachable: irreducible polynomials of every degree exist")


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for the q elements of GF(q) in base-p digit order: 0, +1 (a square) or -1."""
    p, e = _prime_power(q)
    low = _irreducible(p, e)

    def mul(a: int, b: int) -> int:
        x = [(a // p ** i) % p for i in range(e)]
        y = [(b // p ** i) % p for i in range(e)]
        prod = [0] * (2 * e - 1)
        for i, u in enumerate(x):
            for j, v in enumerate(y):
                prod[i + j] = (prod[i + j] + u * v) % p
        for d in range(2 * e - 2, e - 1, -1):  # x^e = -(c_0 + ... + c_{e-1} x^{e-1})
            top, prod[d] = prod[d], 0
            for i, c in enumerate(low):
                prod[d - e + i] = (prod[d - e + i] - top * c) % p
        return sum(c * p ** i for i, c in enumerate(prod[:e]))

    chi = [-1] * q
    chi[0] = 0
    for a in range(1, q):
        chi[mul(a, a)] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q) (subtraction digit-wise mod p)."""
    p, e = _prime_power(q)
    chi = torch.tensor(_quadratic_character(q), dtype=torch.float64)
    idx = torch.arange(q)
    diff = torch.zeros(q, q, dtype=torch.long)
    for i in range(e):
        da = (idx // p ** i) % p
        diff += ((da[:, None] - da[None, :]) % p) * p ** i
    return chi[diff]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley I or II, or None when neither applies."""
    q = m - 1
    if m % 4 == 0 and _prime_power(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]]
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 4 == 0 and _prime_power(q) and q % 4 == 1:  # Paley II from the conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        eye = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron(torch.eye(m // 2, dtype=torch.float64), eye)
    return None


def base_order(n: int) -> int:
    """The ``m`` of ``n = 2^k m`` used by ``hadamard_matrix`` (1 for a power of two): the
    smallest Paley order ``m`` with ``n / m`` a power of two. ValueError when there is none."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Hadamard size must be a positive int, got {n!r}")
    if n & (n - 1) == 0:
        return 1
    odd = n // (n & -n)
    m = odd
    while m <= n:
        if _paley_cached(m) is not None:
            return m
        m *= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} = 2^{(n // odd).bit_length() - 1} x {odd} is "
        "available: qkern builds n = 2^k m with m = 1 (Sylvester) or a Paley order (m = q + 1, "
        "q = 3 mod 4, or m = 2(q + 1), q = 1 mod 4, q a prime power p^e with e <= 3; e.g. m = "
        "12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 100, 108; see qkern.hadamard.supported_sizes)")


@functools.lru_cache(maxsize=64)
def _paley_cached(m: int) -> torch.Tensor | None:
    return _paley(m) if m % 4 == 0 else None


def supported_sizes(limit: int) -> list[int]:
    """Every n <= limit that ``hadamard_matrix`` builds."""
    out = []
    for n in range(1, limit + 1):
        try:
            base_order(n)
        except ValueError:
            continue
        out.append(n)
    return out


def _sylvester(n: int) -> torch.Tensor:
    i = torch.arange(n)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.double()


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Hadamard matrix ``H`` of order ``n`` (entries +-1, ``H H^T = n I``):
    ``H_{2^k} (x) H_m`` with ``H_{2^k}`` Sylvester's (the matrix ``fwht`` applies) and ``H_m``
    from Paley's construction (``base_order``). ValueError for sizes without a construction."""
    m = base_order(n)
    h = _sylvester(n // m)
    if m > 1:
        h = torch.kron(h, _paley_cached(m))
    return h.to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1.0 (float32) from ``seed`` (torch's CPU generator: reproducible)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).float() * 2.0 - 1.0


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Q = H_n diag(s) / sqrt(n)`` with ``s = random_signs(n, seed)``: orthogonal
    (``Q Q^T = I``); ``x @ Q == hadamard_transform(x, s)``."""
    h = hadamard_matrix(n) * random_signs(n, seed).double()[None, :] / math.sqrt(n)
    return h.to(dtype)


@functools.lru_cache(maxsize=64)
def _base_f32(m: int, transpose: bool) -> torch.Tensor:
    h = _paley_cached(m) / math.sqrt(m)
    return (h.T if transpose else h).float().contiguous()


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None,
                       transpose: bool = False) -> torch.Tensor:
    """``x Q`` over the last dimension with ``Q = H_n diag(signs) / sqrt(n)`` (``signs`` None:
    all +1), or ``x Q^T`` when ``transpose``; ``n = 2^k m`` (``base_order``). ``H_n = H_{2^k}
    (x) H_m``, so on ``x`` viewed as ``(..., 2^k, m)`` this is the FWHT over the ``2^k`` axis
    and a product by ``H_m / sqrt(m)`` over the ``m`` axis: O(n (log n + m)) per row. Computed
    in float32; ``x``'s dtype out. Differentiable."""
    n = _check_x("hadamard_transform", x)
    m = base_order(n)
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"hadamard_transform: signs must have shape ({n},), got "
                             f"{tuple(signs.shape)}")
        signs = signs.to(torch.float32)
    y = x.to(torch.float32)
    if transpose and signs is not None:
        y = y * signs
    if m == 1:
        y = torch.ops.qkern.fwht(y)
    else:
        p = n // m
        y = y.reshape(*x.shape[:-1], p, m) @ _base_f32(m, transpose)
        if p > 1:
            y = torch.ops.qkern.fwht(y.transpose(-1, -2)).transpose(-1, -2)
        y = y.reshape(x.shape)
    if not transpose and signs is not None:
        y = y * signs
    return y.to(x.dtype)
