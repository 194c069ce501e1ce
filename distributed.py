"""
Past one GPU: the whole method on many processes, launched by torchrun.

    torchrun --nproc_per_node 8 train.py --model /ckpt/Llama-3.1-8B-Instruct
    torchrun --nproc_per_node 8 ptalign.py generate --out d.jsonl --questions 2000
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...   # each node

`python train.py` starts no process group, and every function here then does what one
process does: the model is not sharded, a sum is the value itself, a list is all this
process's work. Under torchrun there is one process per GPU (NCCL; gloo between CPU
processes), and:

1. the process group   joined from torchrun's environment; rank 0 alone prints and writes
                       the run's files, the other ranks compute and stay quiet;
2. the sharded model   FSDP2: each transformer block, and the root (embeddings, final norm,
                       output projection; an untied embedding is a unit of its own), is
                       sharded over all ranks, with bf16 compute and fp32 master weights,
                       gradients and AdamW state under --precision bf16. The model is built
                       empty and sharded before any weight is read, then each rank reads only
                       its own rows of each tensor from the memory-mapped safetensors;
3. the training step   each rank takes its rows of each global micro-batch; the MLE and UT
                       token counts, the loss sums and the gradient (FSDP's reduce-scatter)
                       are summed over ranks, so N processes of b rows compute what one
                       process computes on N x b rows;
4. lists of work       generation and evaluation run a model replica per rank: evaluation
                       splits its prompts in whole batches, generation deals out its chunks
                       of questions; rank 0 gets every result back, in order;
5. checkpoints         torch.distributed.checkpoint: every rank writes its shards into one
                       temporary directory that rank 0 renames into place once all are done;
                       any number of processes (one included) can resume it;
6. OUT/final           gathered one weight at a time (LoRA merged) and streamed by rank 0
                       into ordinary Hugging Face safetensors: no rank ever holds the model.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from common.files import temp_path, write_json
from data.dataset import IGNORE
from lora import LoRALinear, base_parameter, init_adapter, lora_layers, merge
from model import Transformer, checkpoint_state, hf_name, replace_dir, rope_inv_freq

# How long a rank waits for the others at a collective. Rank 0 alone writes files and draws
# the sampled questions while the others wait for it, which for a 70B model takes a while.
TIMEOUT = timedelta(hours=2)


# -----------------------------------------------------------------------------
# 1. The process group


def launched() -> bool:
    """Whether torchrun (or any launcher that sets the env:// variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> None:
    """Join the process group torchrun set up (one GPU per process); quiet every rank but 0.
    Outside torchrun, or when already joined, nothing."""
    if not launched() or active():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # NCCL for tensors on the GPU, gloo for the CPU (token counts, and every tensor of a CPU run).
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    # Left at exit, after a failing command's message is printed: rank 0 prints it before any
    # rank leaves and torchrun stops the others.
    atexit.register(dist.destroy_process_group)
    if not torch.cuda.is_available():
        return_freed_memory()
    if rank():
        quiet()


def return_freed_memory() -> None:
    """CPU processes: keep glibc from holding on to the buffers FSDP frees.

    glibc serves a large allocation from a mapping of its own, returned to the system when
    freed, until one is freed: it then raises that threshold to the freed size and serves the
    next ones from its heap, where buffers freed out of order (each layer's all-gather and
    reduce-scatter buffers, every step) stay resident. Fixed at its initial 128 KiB, the
    threshold keeps them out of the heap: on the default model, peak RSS per rank 2.1 GB
    instead of 3.1 GB (README; scripts/bench_distributed.py).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


def quiet() -> None:
    """Silence this rank's output: progress, reports and the one-line error a failing run exits
    with are rank 0's to print (every rank reaches the same error). A crash's traceback still
    reaches the terminal."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints and writes the run's files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


# -----------------------------------------------------------------------------
# 2. The sharded model


def load_sharded(path, dtype: torch.dtype, device: torch.device, precision: str, add_adapters=None) -> Transformer:
    """The model to train, sharded over all ranks without ever being whole on one.

    Built on the meta device (shapes only) in `dtype`, given its LoRA adapters by
    add_adapters(model) if any, sharded, then given storage for its shards alone; each rank
    then reads its rows of every checkpoint tensor (memory-mapped). The adapters are drawn
    whole on every rank from the same seed, as one process draws them, and cut the same way.
    """
    model = Transformer.empty(path).to(dtype)
    shapes = {name: p.shape for name, p in model.named_parameters()}  # the checkpoint's names, before adapters
    if add_adapters is not None:
        add_adapters(model)
    shard(model, precision, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in checkpoint_state(model.source_dir, shapes, model.config.architecture):
            fill(base_parameter(model, name), tensor)
        for _, _, layer in lora_layers(model):
            a, b = (torch.empty(p.shape, dtype=p.dtype, device=device) for p in (layer.lora_A, layer.lora_B))
            init_adapter(a, b)
            fill(layer.lora_A, a)
            fill(layer.lora_B, b)
    model.inv_freq = rope_inv_freq(model.config).to(device)
    return model


def shard(model: Transformer, precision: str, device: torch.device) -> None:
    """FSDP2 over all ranks: each block is a unit, all-gathered for its forward and again for its
    backward (or its recomputation under activation checkpointing), then freed; the root unit
    holds the embeddings, final norm and output projection (one tensor when tied).

    Gradients are summed over ranks, not averaged: each rank's loss is already its share of the
    step's mean (train.py divides by the token counts of all ranks).
    """
    mesh = init_device_mesh(device.type, (world(),))
    # bf16: weights all-gathered and used in bf16, gradients reduced and kept in fp32, as are
    # the sharded master weights and AdamW state (an update below bf16's resolution is not lost).
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    units = [*model.layers, *([model.embed_tokens] if model.lm_head is not None else [])]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden_states")  # training calls hidden_states, not forward
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain sum, which gloo has too


def fill(param: DTensor, whole: torch.Tensor) -> None:
    """Copy this rank's rows of a whole tensor into its shard of param (FSDP2 cuts dim 0 as
    torch.chunk does: ceil(rows / world) per rank, the last ranks fewer or none)."""
    local = param.to_local()
    start = rank() * -(-whole.shape[0] // world())
    local.copy_(whole[start : start + local.shape[0]])


# -----------------------------------------------------------------------------
# 3. The training step


def my_rows(micro: list[tuple]) -> list[tuple]:
    """This rank's rows of each global micro-batch (ids, targets, ut): a contiguous run of them.

    A rank left without rows (a short last batch) gets one row with no target: it must still
    run forward and backward, since every rank joins every all-gather and reduce-scatter.
    """
    if world() == 1:
        return micro
    out = []
    for ids, targets, ut in micro:
        lo, hi = rank() * len(ids) // world(), (rank() + 1) * len(ids) // world()
        if lo == hi:
            out.append((ids[:1, :1], torch.full_like(targets[:1, :1], IGNORE), torch.zeros_like(ut[:1, :1])))
        else:
            out.append((ids[lo:hi], targets[lo:hi], ut[lo:hi]))
    return out


def sum_counts(*counts: int) -> list[int]:
    """Each count summed over the ranks (the counts themselves in one process)."""
    if not active():
        return list(counts)
    total = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(total)
    return total.tolist()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place: a NaN on any rank is then a NaN on every rank."""
    if active():
        dist.all_reduce(t)
    return t


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, with the norm of sharded gradients as a plain tensor (every rank's)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# -----------------------------------------------------------------------------
# 4. Lists of work


def map_batches(fn, *lists, batch_size: int) -> list:
    """fn(*lists) (one result per item) computed data-parallel; every rank gets all results, in order.

    Each rank takes a contiguous run of whole batches of batch_size, so every batch is the one
    a single process forms and every result is the one it computes.
    """
    if world() == 1:
        return fn(*lists)
    n_batches = -(-len(lists[0]) // batch_size)
    lo, hi = (rank() * n_batches // world() * batch_size, (rank() + 1) * n_batches // world() * batch_size)
    mine = fn(*(items[lo:hi] for items in lists)) if lo < hi else []  # a rank may get no batch
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    return [r for part in parts for r in part]


def in_turns(jobs: list, work):
    """Jobs whose results rank 0 writes: job i runs on rank i % world. Yields, on rank 0 only,
    (job, result, whether it ran here) in job order, a round of `world` jobs at a time (so a
    run killed mid-way loses at most the round in progress); the other ranks get nothing."""
    for first in range(0, len(jobs), world()):
        turn = jobs[first : first + world()]
        mine = work(turn[rank()]) if rank() < len(turn) else None
        results = [mine]
        if world() > 1:
            results = [None] * world() if is_main() else None
            dist.gather_object(mine, results, dst=0)
        if is_main():
            yield from ((job, result, i == 0) for i, (job, result) in enumerate(zip(turn, results)))


def from_main(fn):
    """fn() computed on rank 0 alone and handed to every rank: where all ranks must work from the
    same sampled values (the generated questions), one process draws them."""
    if world() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# 5. Checkpoints


def save_checkpoint(model, optimizer, trainer_state: dict, out: Path) -> None:
    """OUT/ckpt in torch.distributed.checkpoint's format: every rank writes its shards of the
    trainable weights and their AdamW state into one temporary directory, rank 0 adds
    trainer_state.pt (step, RNG, settings) and renames it into place once every rank is done.
    A crash at any point leaves the previous checkpoint whole."""
    # One temporary directory for all ranks, named after rank 0's pid like every other temporary
    # (common/files.py: temp_path), so start-up cleanup finds it if the run is killed mid-save.
    tmp = from_main(lambda: temp_path(out / "ckpt"))
    dcp.save(training_state(model, optimizer), checkpoint_id=tmp)
    if is_main():
        # No CUDA RNG: a resumed run may see other GPUs, and training draws nothing from them.
        rng = trainer_state["rng"] | {"cuda": []}
        torch.save(trainer_state | {"rng": rng, "sharded": True, "world_size": world()}, tmp / "trainer_state.pt")
        write_json(tmp / "train_config.json", trainer_state["config"])  # as one process's ckpt/ holds it
        replace_dir(tmp, out / "ckpt")
    barrier()


def load_checkpoint(model, optimizer, ckpt: Path) -> None:
    """Weights and AdamW state from a checkpoint save_checkpoint wrote with any number of
    processes, into a model sharded over this run's (or whole, in one process)."""
    state = training_state(model, optimizer)
    with warnings.catch_warnings():  # outside torchrun, one process reading every shard is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def training_state(model, optimizer) -> dict:
    """What a checkpoint holds, by parameter name: the trainable weights (all of them, or the LoRA
    adapters: a frozen base is the source checkpoint's) and their AdamW state."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


# -----------------------------------------------------------------------------
# 6. OUT/final


def save_pretrained(model: Transformer, path: Path, dtype: torch.dtype) -> None:
    """A Hugging Face checkpoint of a sharded model, in dtype, LoRA merged.

    Every rank gathers each weight whole in turn (an all-gather of its shards); rank 0 casts it
    and streams it into the safetensors files, so no rank holds more than one weight beyond its
    shards. The directory appears complete or not at all (Transformer.write_checkpoint).
    """
    adapters = {f"{name}.base.weight": m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    weights = [(name, p) for name, p in model.named_parameters() if ".lora_" not in name]
    # An adapted projection's base weight and bias are the plain projection's once merged.
    specs = {hf_name(name.replace(".base.", ".")): (dtype, tuple(p.shape)) for name, p in weights}

    @torch.no_grad()
    def whole(name: str, p: DTensor) -> torch.Tensor:
        w = p.full_tensor()
        if name in adapters:
            lora = adapters[name]
            w = merge(w, lora.lora_A.full_tensor(), lora.lora_B.full_tensor(), lora.scale)
        return w.to(dtype).cpu()

    tensors = (whole(name, p) for name, p in weights)
    if is_main():
        model.write_checkpoint(path, specs, tensors)
    else:
        for _ in tensors:  # every gather needs every rank
            pass
    barrier()
