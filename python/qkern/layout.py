"""How user granularities map onto the kernels' flat groups (docs/numerics.md, "Shapes").

The kernels see a flat array of consecutive groups. ``to_kernel`` moves the quantization axis
to the front (channel) or the back (group) and flattens; ``from_kernel`` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class Layout:
    granularity: str
    shape: tuple[int, ...]
    axis: int | None = None  # normalized; None for "tensor"
    group_size: int = 0  # elements per kernel group

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def in_kernel_order(self) -> bool:
        """User order is kernel order (``to_kernel`` / ``from_kernel`` of contiguous data are
        views): per tensor, per channel along axis 0, groups along the last axis."""
        g, ax = self.granularity, self.axis
        return g == "tensor" or (g == "channel" and ax == 0) or (
            g == "group" and ax == len(self.shape) - 1)

    @property
    def n_groups(self) -> int:
        return self.numel // self.group_size if self.group_size else 0

    def _moved_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        if self.granularity == "channel":
            s.insert(0, s.pop(self.axis))
        elif self.granularity == "group":
            s.append(s.pop(self.axis))
        return tuple(s)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return (self.shape[self.axis],)
        s = list(self.shape)
        s[self.axis] = s[self.axis] // self.group_size
        return tuple(s)

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        """Data in user layout -> flat contiguous kernel order."""
        if self.granularity == "channel":
            t = t.movedim(self.axis, 0)
        elif self.granularity == "group":
            t = t.movedim(self.axis, -1)
        return t.contiguous().view(-1)

    def from_kernel(self, flat: torch.Tensor) -> torch.Tensor:
        t = flat.view(self._moved_shape())
        if self.granularity == "channel":
            t = t.movedim(0, self.axis)
        elif self.granularity == "group":
            t = t.movedim(-1, self.axis)
        return t.contiguous()

    def scale_to_kernel(self, s: torch.Tensor) -> torch.Tensor:
        if self.granularity == "group":
            s = s.movedim(self.axis, -1)
        return s.contiguous().view(-1)

    def scale_from_kernel(self, flat: torch.Tensor) -> torch.Tensor:
        if self.granularity != "group":
            return flat.view(self.scale_shape)
        moved = list(self.scale_shape)
        moved.append(moved.pop(self.axis))
        return flat.view(moved).movedim(-1, self.axis).contiguous()
