"""Elementwise PyTorch compiled into fused kernels on CUDA (:func:`fused`), as written elsewhere.

Everything that decorates with :func:`fused` is its own plain twin: the CPU tests run the very expression that
inductor compiles on the GPU. Shared by the runtime and by training (``finetune.kernels``); imports only torch.
"""

from __future__ import annotations

import functools
import logging

import torch


@functools.lru_cache(maxsize=1)
def compile_works() -> bool:
    """Whether torch.compile can build CUDA kernels here (inductor needs Triton and a host C compiler).

    ``torch.compile`` is lazy: a missing compiler shows up as an exception at the first call, in the middle of a
    training step. One tiny probe at first use answers it up front; a failure is logged once and everything that
    would have been compiled runs as written.
    """
    if not torch.cuda.is_available():
        return False
    try:
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        return bool((probe(torch.ones(8, device="cuda")) == 3).all())
    except Exception as exc:   # noqa: BLE001 - whatever broke, the eager twins are the same maths
        logging.getLogger(__name__).warning("torch.compile does not work here (%s: %s); running the fused kernels "
                                            "uncompiled", type(exc).__name__, str(exc)[:200])
        return False


def compile_dynamic(fn, backend="inductor"):
    """``torch.compile(fn, dynamic=True)`` with Python floats among the arguments compiled in as constants.

    With ``dynamic=True`` torch also leaves float arguments symbolic (``specialize_float`` off): each becomes a
    float64 tensor on the CPU, and converting it is a C++ kernel. Building the first C++ kernel of a process probes
    the host's vector ISA with a compiler run and a child Python per candidate ISA: 51.5 s of a 20b run's first step on
    an H200 (10 probes), every run, on-disk caches notwithstanding. The floats passed here are a model's constants
    (gpt-oss's SwiGLU ``alpha`` and ``limit``), so each is compiled in, guarded by value: a new value recompiles.
    The setting is torch's own (``torch._dynamo.config.specialize_float``), set only around calls that pass a float.
    """
    compiled = torch.compile(fn, dynamic=True, backend=backend)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not any(type(a) is float for a in (*args, *kwargs.values())):
            return compiled(*args, **kwargs)
        config = torch._dynamo.config
        before, config.specialize_float = config.specialize_float, True
        try:
            return compiled(*args, **kwargs)
        finally:
            config.specialize_float = before

    return call


def fused(fn):
    """``fn`` (elementwise PyTorch, its own plain twin) compiled into fused kernels when its first tensor is on CUDA.

    Shapes are dynamic (the number of routed rows changes every step), so one compilation serves a whole run; float
    arguments are constants (:func:`compile_dynamic`). Where inductor cannot compile (:func:`compile_works`), ``fn``
    runs as written: same maths, more memory traffic.
    """
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = compile_dynamic(fn) if compile_works() else fn
        return compiled(*args, **kwargs)

    return call
