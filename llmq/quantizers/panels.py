"""A symmetric (or upper triangular) ``[n, n]`` float32 matrix held as its upper block rows, in
about half the memory of the dense matrix: GPTQ's Hessian of wide layers on CPU.

Block row ``k`` covers rows ``[k0, k1)`` and columns ``[k0, n)``, with the diagonal block stored
whole. Entries below the diagonal blocks are implied: by symmetry for a Hessian, zero for a
triangular factor. :class:`RowSpill` keeps a copy of a symmetric matrix in a temporary file, from
which it is rebuilt in any symmetric permutation (GPTQ's act-order, and retries with more damping),
so the permutation never needs a second in-memory copy.
"""

from __future__ import annotations

import os
import tempfile

import torch

from llmq.packing import CHUNK_ELEMENTS


class _TriangularRows:
    """``matrix[i1:i2, i1:]``: rows ``[i1, i2)`` of a triangular matrix held in block rows, from
    column ``i1`` on (zero below the diagonal blocks), which is what GPTQ's column loop reads of its
    factor; a view when they lie in one block row of memory, else a copy. Subclasses give
    ``n``, ``block``, ``bounds``, ``dtype``, ``device`` and ``_panel_rows(k, r0, r1)``: rows
    ``[r0, r1)`` of block row ``k``."""

    def __getitem__(self, key: tuple[slice, slice]) -> torch.Tensor:
        rows, cols = key
        if cols != slice(rows.start, None) or rows.step is not None:
            raise IndexError("a triangular factor in block rows gives only [i1:i2, i1:]")
        i1, i2 = rows.start, min(rows.stop, self.n)
        k = i1 // self.block
        k0, k1 = self.bounds[k]
        if i2 <= k1:
            return self._panel_rows(k, i1, i2)[:, i1 - k0:]
        out = torch.zeros(i2 - i1, self.n - i1, dtype=self.dtype, device=self.device)
        r = i1
        while r < i2:
            k = r // self.block
            k0, k1 = self.bounds[k]
            end = min(k1, i2)
            c = max(i1, k0)
            out[r - i1:end - i1, c - i1:] = self._panel_rows(k, r, end)[:, c - k0:]
            r = end
        return out


class UpperPanels(_TriangularRows):
    """``[n, n]`` float32 as block rows of ``block`` rows (the last may be shorter).

    The block rows made by :meth:`zeros` and :meth:`empty` are views into one
    buffer: a single allocation, which the allocator maps and unmaps whole (block rows of their
    own, many below glibc's mmap threshold, would fragment the heap and stay resident once freed).
    """

    def __init__(self, n: int, block: int, panels: list[torch.Tensor]) -> None:
        self.n, self.block = n, block
        self.bounds = [(k, min(k + block, n)) for k in range(0, n, block)]
        if len(panels) != len(self.bounds) or any(
                p.shape != (k1 - k0, n - k0) for p, (k0, k1) in zip(panels, self.bounds, strict=True)):
            raise ValueError(f"panels do not tile the upper triangle of a {n} x {n} matrix in blocks of {block}")
        self.panels = panels

    @classmethod
    def empty(cls, n: int, block: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32, zero: bool = False) -> UpperPanels:
        shapes = [(min(k + block, n) - k, n - k) for k in range(0, n, block)]
        buffer = (torch.zeros if zero else torch.empty)(sum(r * c for r, c in shapes), dtype=dtype, device=device)
        panels, offset = [], 0
        for r, c in shapes:
            panels.append(buffer[offset:offset + r * c].view(r, c))
            offset += r * c
        return cls(n, block, panels)

    @classmethod
    def zeros(cls, n: int, block: int, device: torch.device | str | None = None) -> UpperPanels:
        return cls.empty(n, block, device, zero=True)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, block: int) -> UpperPanels:
        """The upper block rows of ``matrix`` (copied, as float32)."""
        out = cls.empty(matrix.shape[0], block, matrix.device)
        for p, (k0, k1) in zip(out.panels, out.bounds, strict=True):
            p.copy_(matrix[k0:k1, k0:])
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def device(self) -> torch.device:
        return self.panels[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.panels[0].dtype

    def dense(self, symmetric: bool = True) -> torch.Tensor:
        """The full matrix: mirrored below the diagonal blocks, or zero there."""
        out = torch.zeros(self.n, self.n, dtype=self.dtype, device=self.device)
        for p, (k0, k1) in zip(self.panels, self.bounds, strict=True):
            out[k0:k1, k0:] = p
            if symmetric:
                out[k1:, k0:k1] = p[:, k1 - k0:].t()
        return out

    def diag_block(self, k: int) -> torch.Tensor:
        k0, k1 = self.bounds[k]
        return self.panels[k][:, :k1 - k0]

    def diagonal(self) -> torch.Tensor:
        return torch.cat([self.diag_block(k).diagonal() for k in range(len(self.bounds))])

    def set_diagonal_(self, values: torch.Tensor) -> None:
        for k, (k0, k1) in enumerate(self.bounds):
            self.diag_block(k).diagonal().copy_(values[k0:k1])

    def __imul__(self, factor: float) -> UpperPanels:
        for p in self.panels:
            p.mul_(factor)
        return self

    def add_gram_(self, x: torch.Tensor) -> None:
        """``+= xᵀx`` for ``x`` ``[m, n]``: float32 in place; bf16 as one bf16 product per block row
        (float32 accumulation inside the matmul), rounded once and added."""
        for p, (k0, k1) in zip(self.panels, self.bounds, strict=True):
            if x.dtype == torch.float32:
                p.addmm_(x[:, k0:k1].t(), x[:, k0:])
            else:
                p += (x[:, k0:k1].t() @ x[:, k0:]).float()

    def column(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """A copy of the entries above diagonal block ``k``: rows ``[0, k0)``, columns ``[k0, k1)``,
        in the flat scratch ``out`` from :meth:`work`."""
        k0, k1 = self.bounds[k]
        col = view(out, k0, k1 - k0)
        for p, (j0, j1) in zip(self.panels[:k], self.bounds[:k], strict=True):
            col[j0:j1] = p[:, k0 - j0:k1 - j0]
        return col

    def work(self) -> torch.Tensor:
        """Flat scratch for an ``[n, block]`` matrix (reused, so as not to fragment the heap); see :func:`view`."""
        return torch.empty(self.n * self.block, dtype=self.dtype, device=self.device)

    def set_column_(self, k: int, values: torch.Tensor) -> None:
        k0, k1 = self.bounds[k]
        for p, (j0, j1) in zip(self.panels[:k], self.bounds[:k], strict=True):
            p[:, k0 - j0:k1 - j0] = values[j0:j1]

    def _panel_rows(self, k: int, r0: int, r1: int) -> torch.Tensor:
        k0 = self.bounds[k][0]
        return self.panels[k][r0 - k0:r1 - k0]

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(p.sum())) for p in self.panels)  # NaN or inf makes a sum non-finite

    def energy(self, W: torch.Tensor) -> float:
        """``tr(W H Wᵀ)`` for symmetric ``H``, ``W`` ``[out, n]``, in row chunks of ``W``."""
        total = 0.0
        step = max(1, CHUNK_ELEMENTS // max(self.n, 1))
        scratch = torch.empty(min(step, W.shape[0]) * self.n, dtype=self.dtype, device=self.device)
        for p, (k0, k1) in zip(self.panels, self.bounds, strict=True):
            for r in range(0, W.shape[0], step):
                t = torch.mm(W[r:r + step, k0:k1], p, out=view(scratch, min(step, W.shape[0] - r), self.n - k0))
                total += float((t[:, :k1 - k0] * W[r:r + step, k0:k1]).sum())
                total += 2 * float((t[:, k1 - k0:] * W[r:r + step, k1:]).sum())
        return total


class _TemporaryFile:
    """Owns an anonymous temporary file ``self._file`` (gone once closed, even after a crash);
    a context manager that closes it."""

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PanelFile(_TemporaryFile, _TriangularRows):
    """A triangular :class:`UpperPanels` (GPTQ's factor of ``H⁻¹``) moved to an anonymous
    temporary file in ``folder``, from which :meth:`rows` reads a few rows at a time (the solver
    reads it block row by block row); use as a context manager."""

    def __init__(self, matrix: UpperPanels, folder: str | os.PathLike | None = None) -> None:
        self.n, self.block, self.bounds, self.dtype = matrix.n, matrix.block, matrix.bounds, matrix.dtype
        self._file = tempfile.TemporaryFile(dir=folder)
        self._offsets = []  # byte offset of each block row
        offset = 0
        for p in matrix.panels:
            self._offsets.append(offset)
            self._file.write(memoryview(p.contiguous().numpy()).cast("B"))
            offset += p.numel() * self.dtype.itemsize
        self._file.flush()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _panel_rows(self, k: int, r0: int, r1: int) -> torch.Tensor:
        k0 = self.bounds[k][0]
        width = self.n - k0
        out = torch.empty(r1 - r0, width, dtype=self.dtype)
        _read_exactly(self._file, memoryview(out.numpy()).cast("B"),
                      self._offsets[k] + (r0 - k0) * width * self.dtype.itemsize)
        return out


def view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The contiguous ``[rows, cols]`` matrix at the start of the flat buffer ``flat``."""
    return flat[:rows * cols].view(rows, cols)


class RowSpill(_TemporaryFile):
    """A symmetric matrix given as :class:`UpperPanels`, written row by row to an anonymous
    temporary file in ``folder`` (default: the system's temporary folder; gone once closed, even
    after a crash); use as a context manager. :meth:`load` rebuilds it in memory, symmetrically
    permuted."""

    def __init__(self, matrix: UpperPanels, folder: str | os.PathLike | None = None) -> None:
        self.n, self.block, self.dtype = matrix.n, matrix.block, matrix.dtype
        self._file = tempfile.TemporaryFile(dir=folder)
        rows = torch.empty(matrix.block, self.n, dtype=self.dtype)  # one block of full rows, reused
        for k, (k0, k1) in enumerate(matrix.bounds):  # the mirrored part, then the block row
            for p, (j0, j1) in zip(matrix.panels[:k], matrix.bounds[:k], strict=True):
                rows[:k1 - k0, j0:j1] = p[:, k0 - j0:k1 - j0].t()
            rows[:k1 - k0, k0:] = matrix.panels[k]
            self._file.write(memoryview(rows[:k1 - k0].numpy()).cast("B"))
        self._file.flush()

    def load(self, perm: torch.Tensor | None = None) -> UpperPanels:
        """``H[perm][:, perm]`` (``H`` without ``perm``), built one block row at a time."""
        file, row_bytes = self._file, self.n * self.dtype.itemsize
        out = UpperPanels.empty(self.n, self.block, dtype=self.dtype)
        rows = torch.empty(self.block, self.n, dtype=self.dtype)  # one block of full rows, reused
        for panel, (k0, k1) in zip(out.panels, out.bounds, strict=True):
            buf = memoryview(rows.numpy()).cast("B")
            if perm is None:
                _read_exactly(file, buf[:(k1 - k0) * row_bytes], k0 * row_bytes)
                panel.copy_(rows[:k1 - k0, k0:])
            else:
                for j, r in enumerate(perm[k0:k1].tolist()):
                    _read_exactly(file, buf[j * row_bytes:(j + 1) * row_bytes], r * row_bytes)
                torch.index_select(rows[:k1 - k0], 1, perm[k0:], out=panel)
            del buf
        return out


def _read_exactly(file, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``file`` at byte ``offset``."""
    file.seek(offset)
    if file.readinto(buf) != len(buf):
        raise OSError(f"temporary file {file.name} is shorter than what was written to it")
