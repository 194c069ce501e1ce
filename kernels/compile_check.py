"""
Compile every Triton kernel of kernels/ at every launch configuration its launchers can choose,
for sm_80 and sm_90, with Triton's own compiler and the ptxas it ships: no GPU needed.

    python -m kernels.compile_check                 # one line per compiled kernel
    python -m kernels.compile_check --json out.json # the same as JSON (tests/test_compile.py reads it)
    python -m kernels.compile_check --match V=50257 # only the cases whose description has this text
    python -m kernels.compile_check --probe         # the one-read path past ONE_READ_MAX: where it spills

Each kernel is specialised exactly as a launch would specialise it: the launcher's own argument
builders (`loss_kernel_args`, `grad_kernel_args`) run on meta-device tensors of a real shape,
and Triton's runtime binder turns them into the signature and the divisibility hints
(tt.divisibility 16 for pointers, ints and strides that are multiples of 16). For each kernel
it reports registers, stack (spills), shared memory (the software pipeline's buffers), the
widest global load of the logits in the PTX (16 bytes, ld.global.v4.b32 or a 16-byte cp.async,
is a fully vectorised read; rows of an odd V such as GPT-2's 50257 are not 16-byte aligned and
load 2 bytes at a time), and the L1 / L2 eviction hints it asks for.

Triton's interpreter replaces @triton.jit functions when TRITON_INTERPRET=1 (tests set it), and
those cannot be compiled: run this without it (the test starts it in a subprocess).
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from common.files import write_json

from .fused_linear import SCALE_LAUNCH, _scale_kernel
from .pt_loss import (
    _INTERPRETED,
    LOSS_CONFIGS,
    _pt_grad_kernel,
    _pt_loss_kernel,
    choose_loss_configs,
    grad_kernel_args,
    grad_launch,
    loss_kernel_args,
    one_read_width,
)

ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
N_ROWS = 16384
STREAMED_V = 128256  # the vocabulary the streamed configs are compiled for (Llama 3)
ODD_V = 50257  # GPT-2's vocabulary: rows not 16-byte aligned, so the logits load 2 bytes at a time

# -----------------------------------------------------------------------------
# 1. What the launchers can choose


def one_read_vocab(block_v):
    """A vocabulary size whose rows the launcher gives the one-read config of width block_v."""
    return max(16, block_v * 3 // 4)


def loss_cases(dtype, arch):
    """(description, kernel args, constexprs + options) for every `_pt_loss_kernel` launch with
    this dtype on sm_<arch>: each config the launcher can choose there, at a V it chooses it for,
    and in bf16 the streamed configs once more at an odd V (rows that are not 16-byte aligned)."""
    for config in LOSS_CONFIGS:
        one_read = config.kwargs["ONE_READ"]
        if one_read and one_read_width(config.kwargs["BLOCK_V"], arch) is None:
            continue  # too wide for this GPU: its rows are streamed
        vocabs = [one_read_vocab(config.kwargs["BLOCK_V"])] if one_read else [STREAMED_V]
        vocabs += [ODD_V] if not one_read and dtype == torch.bfloat16 else []
        for n_vocab in vocabs:
            if config not in choose_loss_configs(n_vocab, arch):
                raise AssertionError(f"the launcher would not choose {config} for V = {n_vocab} on sm_{arch}")
            layouts = ((True, "2d"), (True, "3d"), (False, "2d")) if n_vocab != ODD_V else ((True, "2d"), (False, "2d"))
            for write_grad, layout in layouts:  # eval and fused_linear: 2-D
                name = f"loss V={n_vocab} {layout} {'grad' if write_grad else 'no-grad'} {_describe(config.kwargs)}"
                args, flags = _loss_launch(n_vocab, dtype, layout, write_grad)
                yield name, _pt_loss_kernel.fn, args, {**flags, **config.all_kwargs()}


def _loss_launch(n_vocab, dtype, layout, write_grad):
    """`loss_kernel_args` on meta tensors of a real shape, as a launch would pass them."""
    logits = _logits(n_vocab, dtype, layout)
    rows = logits.shape[:-1].numel()
    stats = torch.empty(rows, 3, device="meta")
    token_loss, weights = torch.empty(rows, device="meta"), torch.empty(rows, device="meta")
    targets = torch.empty(rows, dtype=torch.long, device="meta")
    is_ut = torch.empty(rows, dtype=torch.bool, device="meta")
    grad = torch.empty(logits.shape, dtype=dtype, device="meta") if write_grad else None
    return loss_kernel_args(logits, targets, is_ut, -100, stats, weights, grad, token_loss)


def grad_cases(dtype):
    """The same for `_pt_grad_kernel`: pt_loss's backward (skip rows with grad_output 1, scalar or
    per-token grad_output) and fused_linear's blocks of columns (written in place)."""
    launch = grad_launch(torch.finfo(dtype).bits // 8)
    constexprs = {k: v for k, v in launch.items() if k != "num_warps"}
    for skip_unit, per_token in itertools.product((True, False), (False, True)):
        n_cols = STREAMED_V if skip_unit else 16384  # fused_linear: a block of a multiple of 128 columns
        logits = _logits(n_cols, dtype, "2d")
        grad = torch.empty(logits.shape, dtype=dtype, device="meta") if skip_unit else logits
        rows = logits.shape[0]
        go = torch.empty(rows if per_token else (), device="meta")
        targets, stats, weights = (
            torch.empty(rows, dtype=torch.long, device="meta"),
            torch.empty(rows, 3, device="meta"),
            torch.empty(rows, device="meta"),
        )
        args, flags = grad_kernel_args(logits, 0, targets, stats, weights, go, grad, skip_unit)
        name = f"grad V={n_cols} {'skip-unit' if skip_unit else 'in-place'} go={'per-token' if per_token else 'scalar'}"
        yield f"{name} {_describe(constexprs)}", _pt_grad_kernel, args, {**flags, **launch}


def scale_cases(dtype):
    """`_scale_kernel` as fused_linear's backward launches it: a weight gradient of Llama 3 8B's
    lm_head (128256 x 4096) times a scalar grad_output."""
    x = torch.empty(STREAMED_V * 4096, dtype=dtype, device="meta")
    constexprs = {k: v for k, v in SCALE_LAUNCH.items() if k != "num_warps"}
    args = (x, x.numel(), torch.empty(1, device="meta"))
    yield f"scale n={x.numel()} {_describe(constexprs)}", _scale_kernel, args, SCALE_LAUNCH


def _logits(n_vocab, dtype, layout):
    """Meta logits as training passes them: (N, V), or (B, T, V) minus its last position (the causal shift)."""
    if layout == "2d":
        return torch.empty(N_ROWS, n_vocab, dtype=dtype, device="meta")
    return torch.empty(N_ROWS // 1024, 1025, n_vocab, dtype=dtype, device="meta")[:, :-1]


def _describe(kwargs):
    return " ".join(f"{k}={v}" for k, v in kwargs.items())


# -----------------------------------------------------------------------------
# 2. Compiling one case as a launch would, and reading what ptxas made of it


def compile_case(fn, args, kwargs, arch):
    """triton.compile of fn for sm_<arch>, specialised on args exactly as JITFunction.run does."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(kernel, arch):
    """Registers, spill bytes (stores + loads) and stack frame of a compiled kernel, from
    `ptxas -v` on its PTX with the flags triton passes, and its shared memory."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(kernel.asm["ptx"])
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
        command = [get_ptxas(arch).path, *flags, str(src), "-o", str(src.with_suffix(".cubin"))]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(
        registers=int(re.search(r"Used (\d+) registers", log).group(1)),
        spill_bytes=spills,
        stack_bytes=int(re.search(r"(\d+) bytes stack frame", log).group(1)),
        shared_bytes=kernel.metadata.shared,
    )


def widest_load_bytes(ptx, elem_bits):
    """Widest global load in the PTX (the logits; the per-row int64 / fp32 vectors load one value
    per row), in bytes: ld.global into registers, or cp.async from global into shared memory
    (the software pipeline's prefetch)."""
    widest = 0
    for vec, bits in re.findall(r"ld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.b(\d+)\s", ptx):
        widest = max(widest, int(vec or 1) * int(bits) // 8)
    for size in re.findall(r"cp\.async\.\w+\.shared\.global[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        widest = max(widest, int(size, 0))
    return widest


def cache_hints(ptx):
    """The L1 / L2 eviction policies the PTX asks for (ld/st qualifiers and createpolicy), sorted."""
    return sorted(set(re.findall(r"L[12]::evict_\w+", ptx)))


def check_all(archs=ARCHS, dtypes=DTYPES, match=None):
    """One result dict per compiled kernel: every case (whose name contains `match`), dtype and arch."""
    results = []
    for arch, (dtype_name, dtype) in itertools.product(archs, dtypes.items()):
        for name, fn, args, kwargs in itertools.chain(loss_cases(dtype, arch), grad_cases(dtype), scale_cases(dtype)):
            if match and match not in name:
                continue
            kernel = compile_case(fn, args, kwargs, arch)
            results.append(
                dict(
                    arch=f"sm_{arch}",
                    dtype=dtype_name,
                    case=name,
                    num_warps=kernel.metadata.num_warps,
                    **resources(kernel, arch),
                    load_bytes=widest_load_bytes(kernel.asm["ptx"], torch.finfo(dtype).bits),
                    hints=cache_hints(kernel.asm["ptx"]),
                )
            )
            print(format_result(results[-1]), flush=True)
    return results


def format_result(r):
    return (
        f"{r['arch']} {r['dtype']:4} {r['case']:88} warps {r['num_warps']:2}  regs {r['registers']:3}  spills "
        f"{r['spill_bytes']:4}  stack {r['stack_bytes']:3}  shared {r['shared_bytes']:6}  load {r['load_bytes']:2} B  "
        f"hints {','.join(r['hints']) or '-'}"
    )


# -----------------------------------------------------------------------------
# 3. The on-chip limit: the one-read kernel at widths past ONE_READ_MAX


def probe(archs=ARCHS):
    """Compile the one-read kernel (with gradient) at widths 8192 to 131072 and 8 to 32 warps:
    where does it start to spill? This is how ONE_READ_MAX was chosen."""
    for arch, dtype_name, k, warps in itertools.product(archs, ("bf16", "fp32"), range(13, 18), (8, 16, 32)):
        block_v = 1 << k
        config = triton.Config(dict(ONE_READ=True, ROWS=1, BLOCK_V=block_v, PER_SM=0, STAGES=1), num_warps=warps)
        logits = _logits(one_read_vocab(block_v), DTYPES[dtype_name], "2d")
        rows = logits.shape[0]
        vectors = [torch.empty(rows, device="meta") for _ in range(2)]
        targets, is_ut = (
            torch.empty(rows, dtype=torch.long, device="meta"),
            torch.empty(rows, dtype=torch.bool, device="meta"),
        )
        args, flags = loss_kernel_args(
            logits, targets, is_ut, -100, torch.empty(rows, 3, device="meta"), vectors[0], logits.clone(), vectors[1]
        )
        kernel = compile_case(_pt_loss_kernel.fn, args, {**flags, **config.all_kwargs()}, arch)
        r = resources(kernel, arch)
        per_thread = block_v // (32 * warps)
        print(
            f"sm_{arch} {dtype_name} BLOCK_V {block_v:6} warps {warps:2} ({per_thread:3} values per thread): "
            f"regs {r['registers']:3} spills {r['spill_bytes']} stack {r['stack_bytes']}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--probe", action="store_true", help="find where the one-read path spills")
    p.add_argument("--match", metavar="TEXT", help="only the cases whose description contains TEXT")
    args = p.parse_args(argv)
    if _INTERPRETED:
        sys.exit("kernels.compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated to keep 3.9 quiet
    if args.probe:
        return probe()
    results = check_all(match=args.match)
    if args.json:
        write_json(args.json, dict(triton=triton.__version__, results=results))


if __name__ == "__main__":
    main()
