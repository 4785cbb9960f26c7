"""The kernel table: which fused matmul a quantized weight runs on.

A :class:`Kernel` is one family of fused matmuls over one set of packed buffers. It says which
weights and activation modes it takes (:meth:`Kernel.reason`: None, or why not), packs a
weight into its buffers (:meth:`Kernel.pack`), runs the product (:meth:`Kernel.forward`) and
names its float twin (the float-activation kernel over the same buffers, which
:meth:`Kernel.weight` pushes the identity through). :func:`register` adds a kernel class to
the table; :func:`select` walks the table in ``order`` and takes the first kernel that accepts
the weight, else says why none did.

Adding a kernel: one module in this package (found and imported by ``kernels/__init__``) with
one ``@register``-ed subclass; a kernel defined elsewhere (a test, a plugin) registers the same
way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..tensor import QTensor

__all__ = ["Kernel", "Selection", "by_name", "one_row", "register", "select", "table",
           "unregister"]


def one_row(k: int) -> torch.Tensor:
    """A (1, k) float32 input for running an op's checks on a layer's buffers (Kernel.plan)."""
    return torch.zeros(1, k)


class Kernel:
    """One fused matmul family. Subclasses set ``names`` (the ``QuantLinear.kernel`` strings it
    runs, the first the default), ``acts`` (activation modes it takes) and ``order`` (its place
    in the table), and implement :meth:`claims`, :meth:`reason`, :meth:`pack` and
    :meth:`matmul`."""

    names: tuple[str, ...] = ()
    acts: tuple[str, ...] = ("none",)
    order: int = 100
    needs: str = ""  # the weights an activation mode other than "none" needs (error message)

    def claims(self, q: QTensor) -> bool:
        """Whether this kernel is meant for ``q``'s format (its reason then explains a miss)."""
        raise NotImplementedError

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        """None when the kernel takes the weight ``q`` (2-D, (out, in)) with activations
        ``act``, else why not, e.g. "group_size 48 is not a multiple of 32"."""
        raise NotImplementedError

    def name(self, q: QTensor, act: str, mode: str) -> str:
        """The kernel string for this weight and mode (one of ``names``)."""
        return self.names[0]

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        """The packed buffers ``{buffer name: tensor}`` of an accepted weight."""
        raise NotImplementedError

    def matmul(self, name: str, x2: torch.Tensor, bufs: dict[str, torch.Tensor],
               bias: torch.Tensor | None, n: int, k: int, q: QTensor) -> torch.Tensor:
        """y (M, n) float32 for x2 (M, k) float32 contiguous."""
        raise NotImplementedError

    def float_twin(self, name: str) -> str:
        """The float-activation kernel over the same buffers (one float product per weight)."""
        return name

    def plan(self, name: str, bufs: dict[str, torch.Tensor], bias: torch.Tensor | None, n: int,
             k: int, q: QTensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function ``x2 (M, k) float32 contiguous CPU -> y (M, n) float32`` running the same
        CPU kernel as :meth:`matmul` without the torch op dispatcher, or None (no such path).
        QuantLinear calls it when nothing needs the op (no autograd, tracing, compiling or
        torch function / dispatch mode): a decode step's GEMV then costs microseconds of
        Python instead of ~80. The buffers are checked once here, by the op's own checks."""
        return None

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        """The weight's QTensor back from the packed buffers: codes, scales and zero points in
        the user layout of ``q`` (``q`` carries the format and layout; its own scale / zero
        point tensors are not read). Exporters read the codes through this."""
        raise NotImplementedError(f"kernel {name!r} cannot give its codes back "
                                  f"(format {q.format.name})")

    def forward(self, name: str, x: torch.Tensor, bufs: dict[str, torch.Tensor],
                bias: torch.Tensor | None, n: int, k: int, q: QTensor) -> torch.Tensor:
        """y (..., n) float32 for x (..., k)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).float().contiguous()
        return self.matmul(name, x2, bufs, bias, n, k, q).reshape(*lead, n)

    def weight(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight (out, in) the kernel computes with, decoded from its buffers:
        rows of the identity pushed through the float twin (W^T = I @ W^T), a block of rows at
        a time so that memory stays O(block * (in + out))."""
        n, k = q.shape
        twin_name = self.float_twin(name)
        twin = by_name(twin_name)
        dev = next(iter(bufs.values())).device  # the identity goes where the layer lives
        out = torch.empty(n, k, dtype=torch.float32, device=dev)
        for k0 in range(0, k, 256):
            k1 = min(k, k0 + 256)
            eye = torch.zeros(k1 - k0, k, dtype=torch.float32, device=dev)
            eye[:, k0:k1] = torch.eye(k1 - k0, device=dev)
            out[:, k0:k1] = twin.forward(twin_name, eye, bufs, None, n, k, q).T
        return out


_TABLE: list[Kernel] = []
_BY_NAME: dict[str, Kernel] = {}


def register(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator: adds an instance of ``cls`` to the table (by ``cls.order``, then
    registration order). Its ``names`` must be new."""
    taken = [n for n in cls.names if n in _BY_NAME]
    if not cls.names or taken:
        raise ValueError(f"kernel {cls.__name__}: names must be non-empty and new, "
                         f"{taken} are taken" if taken else f"kernel {cls.__name__} has no names")
    kernel = cls()
    _TABLE.append(kernel)
    _TABLE.sort(key=lambda k: k.order)  # stable: equal orders keep registration order
    for n in cls.names:
        _BY_NAME[n] = kernel
    return cls


def unregister(cls: type[Kernel]) -> None:
    """Removes ``cls``'s kernel from the table (tests)."""
    for kernel in [k for k in _TABLE if type(k) is cls]:
        _TABLE.remove(kernel)
        for n in kernel.names:
            _BY_NAME.pop(n, None)


def table() -> tuple[Kernel, ...]:
    """The registered kernels in the order :func:`select` tries them."""
    return tuple(_TABLE)


def by_name(name: str) -> Kernel:
    """The kernel that runs ``QuantLinear.kernel == name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_BY_NAME)}") from None


@dataclass(frozen=True)
class Selection:
    """What :func:`select` chose: the kernel, its name, and (for the fallback) why no fused
    kernel took the weight."""

    kernel: Kernel
    name: str
    reason: str | None


FALLBACK = "dequant"


def select(q: QTensor, act: str, mode: str) -> Selection:
    """The first kernel of the table that takes ``q`` with activations ``act`` (``mode``:
    "exact" or "fast"). None of the fused ones: the "dequant" kernel, with the reasons of the
    kernels that claim the format (or "no fused kernel for format X"). An activation mode that
    only fused kernels implement raises ValueError saying what weights it needs."""
    reasons = []
    for kernel in _TABLE:
        if act not in kernel.acts or kernel.names[0] == FALLBACK:
            continue
        why = kernel.reason(q, act, mode)
        if why is None:
            return Selection(kernel, kernel.name(q, act, mode), None)
        if kernel.claims(q):
            reasons.append(f"{'/'.join(kernel.names)}: {why}")
    if act != "none":
        needs = " or ".join(dict.fromkeys(k.needs for k in _TABLE if act in k.acts and k.needs))
        raise ValueError(f"act={act!r} needs {needs}; got {q.format.name} per {q.granularity}")
    reason = "; ".join(reasons) or f"no fused kernel for format {q.format.name}"
    return Selection(by_name(FALLBACK), FALLBACK, reason)


# ---- the weight rules the kernels share (each returns None, or why not) -------------------

def need_format(q: QTensor, names: tuple[str, ...]) -> str | None:
    if q.format.name in names:
        return None
    return f"takes formats {', '.join(names)}, not {q.format.name}"


def need_midtread(q: QTensor) -> str | None:
    if q.quantizer == "midtread":
        return None
    return f"needs the midtread quantizer, got {q.quantizer}"


def need_per_row(q: QTensor) -> str | None:
    """One scale per output channel (granularity "channel", axis 0)."""
    if q.granularity == "channel" and q.axis == 0:
        return None
    return (f"needs one scale per output channel (granularity 'channel', axis 0), got "
            f"granularity {q.granularity!r}, axis {q.axis}")


def need_groups(q: QTensor, group_error) -> str | None:
    """Groups along the input dimension (granularity "group", axis 1) whose size the op takes:
    ``group_error(K, group_size)`` is the op's own rule."""
    if q.granularity != "group" or q.axis != 1:
        return (f"needs groups along in_features (granularity 'group', axis 1), got "
                f"granularity {q.granularity!r}, axis {q.axis}")
    return group_error(q.shape[1], q.group_size)


def need_unsigned_float_zero(q: QTensor) -> str | None:
    """Float zero points (HQQ) only with unsigned codes: the kernels take them as zero points
    of the stored unsigned code, which is the code itself only for uint formats."""
    z = q.zero_point
    if z is None or not z.is_floating_point() or not q.format.signed:
        return None
    return (f"float zero points need an unsigned format (uint{q.format.bits}), got "
            f"{q.format.name}")
