"""One BLAS thread for the engine's many small products.

The engine multiplies small matrices (one image, a few channels) many times. With two BLAS
threads on a busy 2-core machine the threads spin-wait for each other: the batched forward
pass of a digits subnet measured 4.2 s on 64 images with OpenBLAS's default threads and 0.67 s
with one. Long-running entry points (analysis, fine-tuning) run under `one_blas_thread()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with numpy's BLAS limited to one thread (restored afterwards)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield
