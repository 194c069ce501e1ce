"""
The fused loss against its float64 definition.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set in
conftest.py); the "torch" backend is the chunked PyTorch path used when neither CUDA nor the
interpreter is there. Tolerances from the issue: fp32 inputs within 1e-5 relative on loss
and gradients; 16-bit inputs, loss within 1e-3 of the float64 loss of the same 16-bit values,
gradients within one rounding of the gradient's own dtype, whatever grad_output is (it is
folded in before the gradient is rounded). The kernels' compilation for GPUs is checked in
test_compile.py.
"""

import importlib
import inspect
import math

import pytest
import torch

from kernels import LossParts, fused_linear_pt_loss, pt_loss, pt_loss_reference
from kernels.fused_linear import column_block
from kernels.reference import token_weights

P = importlib.import_module("kernels.pt_loss")  # the module (the package exports the function of that name)

REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}  # loss
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # gradient, per element


DEVICE = "cpu"  # where loss_and_grad runs the loss: CUDA for the "triton" backend when there is one


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run a test through the Triton kernel (interpreted on CPU) and through the PyTorch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(P, "_uses_triton", lambda x: False)
    elif torch.cuda.is_available():
        monkeypatch.setitem(globals(), "DEVICE", "cuda")
    elif not P._INTERPRETED:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    return request.param


def make_batch(n_rows, n_vocab, dtype=torch.float32, kind="mixed", seed=0, scale=3.0):
    """Logits (N, V) with targets and ut_mask; half the UT rows confident (p of the target 0.99 to 0.9999)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, n_vocab, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, n_vocab, (n_rows,), generator=gen)
    ut_mask = torch.rand(n_rows, generator=gen) < 0.5
    if kind == "all_mle":
        ut_mask[:] = False
    elif kind == "all_ut":
        ut_mask[:] = True
    elif kind == "all_ignored":
        targets[:] = -100
    elif kind == "mixed":
        targets[torch.rand(n_rows, generator=gen) < 0.2] = -100
    confident = ut_mask & (torch.rand(n_rows, generator=gen) < 0.5) & (targets >= 0)
    if n_vocab > 1:
        for i in confident.nonzero().flatten().tolist():
            p = 0.99 + 0.0099 * torch.rand((), generator=gen, dtype=torch.float64)
            others = torch.cat([z[i, : targets[i]], z[i, targets[i] + 1 :]])
            z[i, targets[i]] = torch.logsumexp(others, 0) + torch.log(p / (1 - p))
    return z.to(dtype), targets, ut_mask


def rel_err(x, ref):
    """Relative error of x against a float64 reference, by norm (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-300)).item() if ref.norm() > 0 else x.norm().item()


def assert_grad_close(g, ref, roundings=1):
    """Every element within `roundings` roundings to g's dtype of the float64 gradient (or one subnormal step)."""
    finfo = torch.finfo(g.dtype)
    bound = roundings * (GRAD_TOL[g.dtype] * 1.01 * ref.abs() + finfo.smallest_normal * finfo.eps)
    excess = ((g.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"gradient off by {excess:.3g} beyond {roundings} rounding(s) of {g.dtype}"


def on_device(t):
    """t on DEVICE with its strides kept: a row stride must reach the kernel as it is."""
    if not isinstance(t, torch.Tensor) or t.device.type == DEVICE:
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t)


def dev(*tensors):
    """The tensors on DEVICE (strides kept), for tests that call the loss directly."""
    moved = [on_device(t) for t in tensors]
    return moved[0] if len(moved) == 1 else moved


def loss_and_grad(fn, logits, *args, grad_output=None, **kwargs):
    """fn's loss and the gradient of (loss * grad_output).sum() with respect to logits (on the CPU)."""
    logits = on_device(logits.detach()).requires_grad_()  # detach, not clone: the layout stays
    loss = fn(logits, *map(on_device, args), **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype).to(loss.device)
    loss.backward(go)
    return loss.detach().cpu(), logits.grad.cpu()


def check_against_reference(logits, targets, ut_mask, alpha=1.0, reduction="mean", grad_output=None, **kwargs):
    """pt_loss vs the float64 reference on the same values: loss and gradient within the dtype's tolerance."""
    loss, grad = loss_and_grad(
        pt_loss, logits, targets, ut_mask, alpha=alpha, reduction=reduction, grad_output=grad_output, **kwargs
    )
    ref_loss, ref_grad = loss_and_grad(
        pt_loss_reference, logits.double(), targets, ut_mask, alpha=alpha, reduction=reduction, grad_output=grad_output
    )
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol = REL_TOL[logits.dtype]
    if reduction == "none":  # every token's loss, not just their sum
        assert torch.allclose(loss.double(), ref_loss, rtol=tol, atol=1e-30)
    else:
        assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item()) + 1e-30
    assert_grad_close(grad, ref_grad)
    return loss, grad


# -----------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_gradcheck(reduction):
    logits, targets, ut_mask = make_batch(7, 5, torch.float64, seed=1)
    targets[0], ut_mask[1], ut_mask[2] = -100, True, False
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: pt_loss_reference(z, targets, ut_mask, alpha=0.7, reduction=reduction), (logits,)
    )


def test_reference_is_the_formula():
    """Checked against -log p and -log(1 - p) from a plain softmax, where that is still accurate."""
    logits, targets, ut_mask = make_batch(40, 11, torch.float64, seed=2, scale=1.0)
    p = torch.softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    active = targets != -100
    mle, ut = active & ~ut_mask, active & ut_mask
    expected = (-p.log())[mle].sum() / mle.sum() + 0.3 * (-(1 - p).log())[ut].sum() / ut.sum()
    loss, parts = pt_loss_reference(logits, targets, ut_mask, alpha=0.3, return_parts=True)
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert torch.allclose(parts.mle + 0.3 * parts.ut, loss, rtol=1e-12)
    assert (parts.n_mle.item(), parts.n_ut.item()) == (mle.sum().item(), ut.sum().item())


# -----------------------------------------------------------------------------
# pt_loss against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dtypes_and_reductions(backend, dtype, reduction):
    logits, targets, ut_mask = make_batch(48, 1003, dtype, seed=3)
    go = torch.randn(48, generator=torch.Generator().manual_seed(4)) if reduction == "none" else torch.tensor(2.5)
    check_against_reference(logits, targets, ut_mask, alpha=0.7, reduction=reduction, grad_output=go)


@pytest.mark.parametrize("kind", ["mixed", "all_mle", "all_ut", "all_ignored"])
def test_token_roles(backend, kind):
    logits, targets, ut_mask = make_batch(40, 517, seed=5, kind=kind)
    loss, grad = check_against_reference(logits, targets, ut_mask, alpha=0.5)
    if kind == "all_ignored":
        assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("n_vocab", [1, 2, 4097, 32000, 49152, 50257, 128256, 151936, 256000])  # 50257: odd
def test_vocabulary_sizes(backend, n_vocab):
    logits, targets, ut_mask = make_batch(4, n_vocab, torch.bfloat16, seed=6)
    targets[0], ut_mask[0] = n_vocab - 1, False  # the last column is somebody's target
    if n_vocab == 1:
        ut_mask[:] = False  # with one word, 1 - p is 0: only MLE makes sense
    check_against_reference(logits, targets, ut_mask)


def test_confident_rows_are_exact(backend):
    """UT rows at p = 0.99..0.9999 and MLE rows at p ~ 1: no 1 - p cancellation in loss or gradient."""
    logits, targets, ut_mask = make_batch(64, 2000, seed=7, scale=1.0)
    mle = ~ut_mask & (targets >= 0)
    logits[mle, targets[mle]] += 12.0  # MLE loss ~ 1e-2 .. 1e-3
    for dtype in (torch.float32, torch.bfloat16):  # elementwise, so the target column is checked on its own
        check_against_reference(logits.to(dtype), targets, ut_mask, reduction="none")


def test_certain_rows(backend):
    """Rows the model is certain of (others 200 nats down): the UT loss is the exact ~194 nats, not capped."""
    logits = torch.zeros(2, 300)
    logits[:, 7] = 200.0
    targets, ut_mask = torch.tensor([7, 7]), torch.tensor([True, False])
    loss, grad = check_against_reference(logits, targets, ut_mask, reduction="none")
    assert math.isclose(loss[0].item(), 200.0 - math.log(299), rel_tol=1e-6)
    assert grad[0, 7] == 1.0 and torch.allclose(grad[0, :7], torch.tensor(-1 / 299))  # p_y = 1 pushes down


def test_no_competitor(backend):
    """V = 1 (or every other logit -inf): -log p = 0, 1 - p = 0 so the UT loss is +inf, gradients finite."""
    z = dev(torch.tensor([[3.0], [3.0]])).requires_grad_()
    loss = pt_loss(z, *dev(torch.tensor([0, 0]), torch.tensor([False, True])), reduction="none")
    loss.sum().backward()
    assert loss.tolist() == [0.0, math.inf] and z.grad.tolist() == [[0.0], [1.0]]
    z = dev(torch.tensor([[3.0, -math.inf, -math.inf]])).requires_grad_()
    loss = pt_loss(z, *dev(torch.tensor([0]), torch.tensor([True])), reduction="sum")
    loss.backward()
    assert loss.item() == math.inf and z.grad.tolist() == [[1.0, 0.0, 0.0]]


def test_strided_rows_and_3d(backend):
    """Rows with a stride (a slice of a wider buffer) and sliced (B, T, V) logits: read in place."""
    wide, targets, ut_mask = make_batch(30, 777, seed=8)
    targets = targets.clamp(max=700)
    _, grad = check_against_reference(wide[:, :701], targets, ut_mask)
    z = dev(wide.clone())
    pt_loss(z[:, :701].requires_grad_(), *dev(targets, ut_mask), inplace=True).backward()
    z = z.cpu()
    assert torch.allclose(z[:, :701], grad, rtol=1e-5, atol=1e-12)  # written into the view: no copy was made
    assert torch.equal(z[:, 701:], wide[:, 701:])
    logits3, targets3, ut3 = make_batch(3 * 11, 301, seed=9)
    logits3 = logits3.view(3, 11, 301)[:, :-1]  # the causal-LM shift: not viewable as (N, V)
    targets3, ut3 = targets3.view(3, 11)[:, :-1], ut3.view(3, 11)[:, :-1]
    for reduction in ("mean", "none"):
        check_against_reference(
            logits3, targets3, ut3, reduction=reduction, grad_output=torch.rand(3, 10) if reduction == "none" else None
        )


def test_inplace(backend):
    logits, targets, ut_mask = make_batch(32, 999, torch.bfloat16, seed=10)
    _, ref_grad = loss_and_grad(pt_loss_reference, logits.double(), targets, ut_mask)
    t, u = dev(targets, ut_mask)
    z = dev(logits.clone()).requires_grad_()
    loss = pt_loss(z, t, u, inplace=True)
    assert torch.equal(z.detach().cpu(), logits)  # forward only reads
    loss.backward(dev(torch.tensor(3.0)))
    assert torch.equal(z.detach(), z.grad)  # the logits buffer now holds the gradient
    assert_grad_close(z.grad.cpu(), 3 * ref_grad)
    z = dev(logits.clone()).requires_grad_()
    pt_loss(z, t, u, inplace=True).backward()
    assert_grad_close(z.grad.cpu(), ref_grad)
    z = dev(logits.clone()).requires_grad_()
    pt_loss(z, t, u).backward()
    assert torch.equal(z.detach().cpu(), logits)  # default: untouched
    # something else that still needs the logits' values makes autograd refuse, not compute garbage
    h = dev(logits.float()).requires_grad_()
    logits2 = h.exp()  # exp saves its output for backward
    loss = pt_loss(logits2, t, u, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_twice_and_no_grad(backend):
    """A second backward recomputes the gradient (the first one's buffer went to autograd);
    in place, the logits are gone after the first, so it refuses."""
    logits, targets, ut_mask = make_batch(16, 300, seed=11)
    t, u = dev(targets, ut_mask)
    z = dev(logits.clone()).requires_grad_()
    loss = pt_loss(z, t, u)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward(dev(torch.tensor(0.5)))
    assert torch.allclose(z.grad, 1.5 * first, rtol=1e-6, atol=0)
    z = dev(logits.clone()).requires_grad_()
    loss = pt_loss(z, t, u, inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()
    with torch.no_grad():
        z2 = dev(logits.clone())
        assert torch.equal(pt_loss(z2, t, u, inplace=True), loss.detach())
        assert torch.equal(z2.cpu(), logits)  # nothing written without a gradient to write


def test_parts(backend):
    logits, targets, ut_mask = make_batch(50, 400, seed=12)
    loss, parts = pt_loss(*dev(logits, targets, ut_mask), alpha=0.4, return_parts=True)
    loss, parts = loss.cpu(), LossParts(*(x.cpu() for x in parts))
    ref_loss, ref_parts = pt_loss_reference(logits.double(), targets, ut_mask, alpha=0.4, return_parts=True)
    assert isinstance(parts, LossParts)
    assert torch.allclose(parts.mle + 0.4 * parts.ut, loss, rtol=1e-6)
    for got, want in zip(parts, ref_parts):
        assert torch.allclose(got.double(), want.double(), rtol=1e-5)


def test_out_of_range_target_gives_nan(backend):
    logits, targets, ut_mask = make_batch(4, 50, seed=13)
    targets[1] = 50
    assert torch.isnan(pt_loss(*dev(logits, targets, ut_mask), reduction="none")[1])


def test_strided_targets_and_mask(backend):
    """targets and ut_mask with any strides (every other entry of a buffer, a column, a transpose)
    give the loss of their values, as if contiguous."""
    logits, targets, ut_mask = make_batch(40, 333, seed=21)
    spaced = torch.full((80,), 7)
    spaced[::2] = targets
    columns = torch.zeros(40, 3, dtype=torch.bool)
    columns[:, 1] = ut_mask
    check_against_reference(logits, spaced[::2], columns[:, 1], alpha=0.8)
    logits3 = logits.view(5, 8, 333)
    targets_bt = targets.view(5, 8).t().contiguous().t()  # the (5, 8) values, column-major
    assert not targets_bt.is_contiguous()
    check_against_reference(logits3, targets_bt, ut_mask.view(5, 8), reduction="none", grad_output=torch.rand(5, 8))
    gen = torch.Generator().manual_seed(22)
    hidden, weight = dev(torch.randn(40, 16, generator=gen), torch.randn(333, 16, generator=gen))
    loss = fused_linear_pt_loss(hidden, weight, *dev(spaced[::2], columns[:, 1]), chunk_size=16)
    assert torch.equal(loss, fused_linear_pt_loss(hidden, weight, *dev(targets, ut_mask), chunk_size=16))


@pytest.mark.parametrize("grad_output, reduction", [(1024.0, "mean"), (65536.0, "mean"), (1 / 1024, "sum")])
def test_fp16_under_loss_scaling(backend, grad_output, reduction):
    """fp16 logits with a GradScaler's grad_output: it is folded in before the gradient is
    rounded, so every entry the float64 gradient has above fp16's smallest normal survives,
    each within one rounding."""
    logits, targets, ut_mask = make_batch(256, 2000, torch.float16, seed=23)
    go = torch.tensor(grad_output)
    _, grad = check_against_reference(logits, targets, ut_mask, reduction=reduction, grad_output=go)
    _, ref = loss_and_grad(pt_loss_reference, logits.double(), targets, ut_mask, reduction=reduction, grad_output=go)
    kept = ref.abs() > torch.finfo(torch.float16).smallest_normal
    assert kept.sum() >= 100 and (grad[kept] != 0).all()
    if grad_output > 1:  # entries that rounding before scaling would have lost, or kept as subnormals
        assert (ref[kept].abs() / grad_output < torch.finfo(torch.float16).smallest_normal).sum() >= 100


def test_minus_inf_target(backend):
    """A target logit of -inf: p = 0, so the MLE loss is +inf and the UT loss 0, with finite gradients."""
    logits, targets, ut_mask = make_batch(6, 50, seed=24, kind="all_mle")
    ut_mask[1] = True
    logits[0, targets[0]] = logits[1, targets[1]] = float("-inf")
    loss, grad = loss_and_grad(pt_loss, logits, targets, ut_mask, reduction="sum")
    ref_tokens = pt_loss_reference(logits.double(), targets, ut_mask, reduction="none")
    assert loss == math.inf and ref_tokens[0] == math.inf and ref_tokens[1] == 0
    _, ref_grad = loss_and_grad(pt_loss_reference, logits.double(), targets, ut_mask, reduction="sum")
    assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    assert_grad_close(grad, ref_grad)
    assert grad[0, targets[0]] == -1.0 and (grad[1] == 0).all()  # all of p on the others; a UT row at p = 0 rests


@pytest.mark.parametrize("n_vocab", [P.one_read_width(1), 16384, 16400])
def test_one_read_path_and_its_limit(backend, n_vocab):
    """The path that holds the row on chip (V up to its limit), and the streamed one just past it."""
    one_read = P.one_read_width(n_vocab) is not None
    assert one_read == (n_vocab <= min(P.ONE_READ_MAX.values()))
    if P._INTERPRETED:
        assert P.choose_loss_configs(n_vocab, None)[0].kwargs["ONE_READ"] == one_read
    logits, targets, ut_mask = make_batch(6, n_vocab, torch.bfloat16, seed=25)
    targets[0], ut_mask[0] = n_vocab - 1, False  # the last column is somebody's target
    check_against_reference(logits, targets, ut_mask, grad_output=torch.tensor(0.3))


@pytest.mark.parametrize("n_vocab", [1500, 1501])  # 1501: rows not 16-byte aligned
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_pass_persistent_grid(monkeypatch, n_vocab, dtype):
    """The streamed kernel (per-lane running max and sum, one reduction per row) against float64,
    with the limits shrunk so that a small V behaves as 128256 does on a GPU: rows past the
    on-chip limit (1024 here), 6 blocks of 256 columns a row, and a persistent grid of 2
    programs over 5 tiles of 16 rows. Forward with gradient, without, and backward's rewrite."""
    if not P._INTERPRETED:
        pytest.skip("the launch limits are forced for the interpreter")
    monkeypatch.setattr(P, "ONE_READ_MAX", {80: 1024, 90: 1024})
    monkeypatch.setitem(P.INTERPRETER_LAUNCH, "stream_block", 256)
    monkeypatch.setitem(P.INTERPRETER_LAUNCH, "max_programs", 2)
    monkeypatch.setattr(P._pt_loss_kernel, "cache", {})  # no config tuned under the usual limits
    launches = []
    grid_size = P.grid_size
    monkeypatch.setattr(P, "grid_size", lambda n, *a, **k: launches.append(n) or grid_size(n, *a, **k))
    config = P.choose_loss_configs(n_vocab, None)[0].kwargs
    assert not config["ONE_READ"] and (config["BLOCK_V"], config["ROWS"]) == (256, 16)
    logits, targets, ut_mask = make_batch(70, n_vocab, dtype, seed=34)
    targets[0], ut_mask[0] = n_vocab - 1, False  # the last column, in the last (partial) block
    logits[1, 5] = logits[1, 5 + 4 * 256] = 12.0  # the row max twice, in one lane: two tied maxima
    # (an MLE row: on a UT row this peaked the float64 reference's own gradient loses digits)
    targets[1], ut_mask[1] = 7, False
    check_against_reference(logits, targets, ut_mask, alpha=0.7)  # gradient from forward
    check_against_reference(logits, targets, ut_mask, reduction="none", grad_output=torch.rand(70))  # rewritten
    assert launches and set(launches) <= {5, 70 // 16 + 1}  # 5 tiles of 16 rows (grad kernel: 16 too)
    with torch.no_grad():
        loss = pt_loss(logits, targets, ut_mask, reduction="none")
    ref = pt_loss_reference(logits.double(), targets, ut_mask, reduction="none")
    assert torch.allclose(loss.double(), ref, rtol=REL_TOL[dtype], atol=1e-30)


def test_autotune_key_has_every_switch(backend):
    """Every compile-time switch of the loss kernel is either tuned (a config's) or in the
    autotune key, so the forward with and without the gradient are tuned apart."""
    kernel = P._pt_loss_kernel
    parameters = inspect.signature(kernel.fn.fn).parameters.values()  # the Python function (compiled or interpreted)
    constexprs = {p.name for p in parameters if "constexpr" in str(p.annotation)}
    tuned = set().union(*(c.kwargs for c in P.LOSS_CONFIGS))
    assert constexprs == tuned | {"WRITE_GRAD"} and "WRITE_GRAD" in kernel.keys
    if backend == "torch":
        return
    logits, targets, ut_mask = make_batch(8, 2999, seed=35)
    logits, targets, ut_mask = dev(logits, targets, ut_mask)
    kernel.cache.clear()
    with torch.no_grad():
        pt_loss(logits, targets, ut_mask)
    pt_loss(logits.requires_grad_(), targets, ut_mask).backward()
    keys = sorted(kernel.cache, key=str)
    assert len(keys) == 2 and {k[:2] for k in keys} == {(2999, False), (2999, True)}


def test_forward_only_launch(backend, monkeypatch):
    """A forward without gradient gets the full grid and no L2 bound; with the gradient the
    streamed forward is bounded by the rows L2 holds between its two reads."""
    streamed = dict(ROWS=1, PER_SM=1)
    h100 = (132, 50 << 20)
    row_bytes = 128256 * 2
    assert P.grid_size(16384, streamed, h100) == 132  # every SM
    assert P.grid_size(16384, streamed, h100, row_bytes) == (25 << 20) // row_bytes == 102
    assert P.grid_size(16384, dict(ROWS=1, PER_SM=0), h100, row_bytes) == 16384  # one program per tile
    if backend == "torch":
        return
    bounds, grid_size = [], P.grid_size
    record = lambda n, meta, caps, bound=None: bounds.append(bound) or grid_size(n, meta, caps)  # noqa: E731
    monkeypatch.setattr(P, "grid_size", record)
    logits, targets, ut_mask = dev(*make_batch(8, 300, seed=36))
    with torch.no_grad():
        pt_loss(logits, targets, ut_mask)
    pt_loss(logits.clone().requires_grad_(), targets, ut_mask).backward()
    assert bounds[0] is None and bounds[1] == 300 * 4  # fp32 rows


def test_grad_output_one_reads_nothing_in_backward(backend):
    """With grad_output exactly 1 backward leaves the gradient forward wrote: here logits changed
    behind autograd's back after forward do not show in it. Any other grad_output rewrites it."""
    logits, targets, ut_mask = make_batch(40, 300, seed=26)
    _, expected = loss_and_grad(pt_loss, logits, targets, ut_mask)
    t, u = dev(targets, ut_mask)
    z = dev(logits.clone()).requires_grad_()
    loss = pt_loss(z, t, u)
    z.data.mul_(3.0)  # no version bump: only a read of the logits would notice
    loss.backward()
    assert torch.equal(z.grad.cpu(), expected)
    z = dev(logits.clone()).requires_grad_()
    loss = pt_loss(z, t, u)
    z.data.mul_(3.0)
    loss.backward(dev(torch.tensor(1.0 + 2**-20)))
    assert not torch.allclose(z.grad.cpu(), expected, rtol=1e-3)


@pytest.mark.skipif(not P._INTERPRETED, reason="the sparse-file trick is for the interpreter on CPU")
def test_64bit_offsets(tmp_path):
    """Rows more than 2^31 elements apart, in a sparse memory-mapped file: int32 offsets would wrap."""
    n_vocab, stride = 300, 2**30 + 17
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate((2 * stride + n_vocab) * 2)
    storage = torch.from_file(str(path), shared=True, size=2 * stride + n_vocab, dtype=torch.bfloat16)
    logits = storage.as_strided((3, n_vocab), (stride, 1))
    rows, targets, ut_mask = make_batch(3, n_vocab, torch.bfloat16, kind="all_mle", seed=14)
    logits.copy_(rows)
    z = logits.requires_grad_()
    loss = pt_loss(z, targets, ut_mask, reduction="none", inplace=True)
    loss.backward(torch.ones_like(loss))
    ref = pt_loss_reference(rows.double(), targets, ut_mask, reduction="none")
    assert torch.allclose(loss.double(), ref, rtol=1e-5)
    _, ref_grad = loss_and_grad(pt_loss_reference, rows.double(), targets, ut_mask, reduction="none")
    assert_grad_close(logits.detach(), ref_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU test (kernels/gpu_check.py runs it): 18 GB")
@pytest.mark.parametrize("n_vocab", [16384, 128256])  # the one-read path and the streamed one
def test_more_than_2_31_elements_on_cuda(n_vocab):
    """bf16 logits of more than 2^31 elements, forward and backward (grad_output 1, then per token,
    in place): the last rows, whose offsets pass 2^31, against float64."""
    n_rows = 2**31 // n_vocab + 64
    gen = torch.Generator(device="cuda").manual_seed(29)
    logits = torch.randn(n_rows, n_vocab, generator=gen, device="cuda").mul_(2).bfloat16()
    targets = torch.randint(0, n_vocab, (n_rows,), generator=gen, device="cuda")
    ut_mask = torch.rand(n_rows, generator=gen, device="cuda") < 0.3
    go = torch.rand(n_rows, generator=gen, device="cuda")
    last = slice(-64, None)
    rows, t, u, g = logits[last].double().cpu(), targets[last].cpu(), ut_mask[last].cpu(), go[last].cpu()
    _, ref_grad = loss_and_grad(pt_loss_reference, rows, t, u, reduction="sum")
    _, ref_grad_go = loss_and_grad(pt_loss_reference, rows, t, u, reduction="none", grad_output=g)
    z = logits.requires_grad_()
    loss = pt_loss(z, targets, ut_mask, reduction="none")
    loss.sum().backward()
    assert logits.numel() > 2**31 and torch.isfinite(loss).all()
    ref = pt_loss_reference(rows, t, u, reduction="none")
    assert torch.allclose(loss[last].double().cpu(), ref, rtol=1e-5)
    assert_grad_close(z.grad[last].cpu(), ref_grad)
    z.grad = None
    pt_loss(z, targets, ut_mask, reduction="none", inplace=True).backward(go)
    assert_grad_close(z.grad[last].cpu(), ref_grad_go)


# -----------------------------------------------------------------------------
# The fused-linear variant against the plain one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear(backend, dtype, reduction):
    n_rows, hidden_size, n_vocab = 45, 32, 509
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(n_rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(n_vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3).to(dtype)
    _, targets, ut_mask = make_batch(n_rows, n_vocab, seed=16)
    go = torch.randn(n_rows, generator=gen) if reduction == "none" else torch.tensor(0.5)

    def run(fn, h, w, **kwargs):
        device = "cpu" if h.dtype == torch.float64 else DEVICE  # the reference stays on the CPU
        h, w = h.detach().clone().to(device).requires_grad_(), w.detach().clone().to(device).requires_grad_()
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        loss = fn(h, w, **kwargs)
        loss.backward(go.to(loss.dtype).to(device))
        return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()

    kwargs = dict(targets=targets, ut_mask=ut_mask, alpha=1.3, reduction=reduction)
    loss, g_h, g_w = run(fused_linear_pt_loss, hidden, weight, chunk_size=16, **kwargs)  # 16 + 16 + 13 rows
    ref, ref_h, ref_w = run(
        lambda h, w, **kw: pt_loss_reference(h @ w.t(), **kw), hidden.double(), weight.double(), **kwargs
    )
    assert g_h.dtype == dtype and g_w.dtype == dtype
    # fp32: matmuls in fp32 as the only difference; bf16: logits rounded to bf16 before the loss
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(loss, ref) <= tol and rel_err(g_h, ref_h) <= tol and rel_err(g_w, ref_w) <= tol
    # against the plain kernel on the same bf16 logits, bf16 agrees much closer
    plain, plain_h, plain_w = run(lambda h, w, **kw: pt_loss(h @ w.t(), **kw), hidden, weight, **kwargs)
    assert rel_err(loss, plain) <= 1e-6
    assert rel_err(g_h, plain_h) <= 4 * GRAD_TOL[dtype] and rel_err(g_w, plain_w) <= 4 * GRAD_TOL[dtype]


def test_gradient_from_row_statistics(backend):
    """What fused-linear's backward does: rebuild the gradient block by block from 3 numbers per row."""
    logits, targets, ut_mask = make_batch(40, 700, torch.bfloat16, seed=19)
    weights = torch.rand(40, generator=torch.Generator().manual_seed(20))
    logits, targets, ut_mask, weights = dev(logits, targets, ut_mask, weights)
    fused, stats = torch.empty_like(logits), dev(torch.empty(40, 3))
    loss = P.token_losses(logits, targets, ut_mask, -100, stats, weights, grad=fused)
    assert torch.equal(P.token_losses(logits, targets, ut_mask, -100, torch.empty_like(stats)), loss)
    rebuilt = torch.empty_like(logits)
    for v0 in range(0, 700, 256):
        block = slice(v0, v0 + 256)
        grad_output = dev(torch.tensor(1.0))
        P.grads_from_stats(logits[:, block].contiguous(), v0, targets, stats, weights, grad_output, rebuilt[:, block])
    assert_grad_close(rebuilt.cpu(), fused.cpu().double())  # within one rounding


def _exact_bf16_problem(n_rows=40, hidden_size=16, n_vocab=700, seed=27):
    """bf16 hidden states and weight whose logits are exact in bf16 (small integers over 2), so the
    gradient of the logits is known exactly: `grads_from_stats` on the full logits."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-1, 2, (n_rows, hidden_size), generator=gen).to(torch.bfloat16)
    weight = (torch.randint(-2, 3, (n_vocab, hidden_size), generator=gen) / 2).to(torch.bfloat16)
    _, targets, ut_mask = make_batch(n_rows, n_vocab, seed=seed + 1)
    return hidden, weight, targets, ut_mask


def _logit_gradient(hidden, weight, targets, ut_mask, weights, go=None):
    """d loss / d logits as the kernels round it, on the CPU: from the forward kernel (go None)
    or, weighted by go, from the row stats as the exact path makes it."""
    logits = dev(hidden) @ dev(weight).t()
    assert torch.equal(logits.double().cpu(), hidden.double() @ weight.double().t())  # exact
    t, u = dev(targets, ut_mask)
    stats, grad = dev(torch.empty(hidden.shape[0], 3)), torch.empty_like(logits)
    P.token_losses(logits, t, u, -100, stats, dev(weights), grad if go is None else None)
    if go is not None:
        P.grads_from_stats(logits, 0, t, stats, dev(weights), dev(go), grad)
    return grad.double().cpu()


def test_fused_linear_exact_path_sums_in_fp32(backend):
    """The exact path (here reduction="none", a grad_output per token) through 6 blocks of 128
    columns: the hidden gradient is the float64 product of the gradient blocks, rounded once to
    bf16 at the end (not once per block), and so is each block of the weight gradient."""
    hidden, weight, targets, ut_mask = _exact_bf16_problem()
    n_rows = hidden.shape[0]
    go = torch.full((n_rows,), 0.37)
    h, w = dev(hidden).requires_grad_(), dev(weight).requires_grad_()
    fused_linear_pt_loss(h, w, *dev(targets, ut_mask), alpha=0.6, chunk_size=8, reduction="none").backward(dev(go))
    assert column_block(8, n_rows, 700) == 128  # 8 rows a chunk: blocks of 128 columns
    grad = _logit_gradient(hidden, weight, targets, ut_mask, token_weights(targets, ut_mask, 0.6, -100, "none"), go)
    assert_grad_close(h.grad.cpu(), grad @ weight.double())
    assert_grad_close(w.grad.cpu(), grad.t() @ hidden.double())


def test_fused_linear_training_path_is_three_gemms(backend):
    """With the gradient wanted (bf16, "mean"), forward makes it: 3 GEMMs per chunk and none in
    backward. The hidden gradient is one GEMM over all columns, rounded once; the weight gradient's
    running sum is rounded once per chunk (5 chunks of 8 rows here)."""
    hidden, weight, targets, ut_mask = _exact_bf16_problem()
    h, w = dev(hidden).requires_grad_(), dev(weight).requires_grad_()
    with GemmCount() as forward:
        loss = fused_linear_pt_loss(h, w, *dev(targets, ut_mask), alpha=0.6, chunk_size=8)
    with GemmCount() as backward:
        loss.backward()
    assert (forward.n, backward.n) == (3 * 5, 0)
    weights = token_weights(targets, ut_mask, 0.6, -100, "mean")
    grad = _logit_gradient(hidden, weight, targets, ut_mask, weights)
    assert_grad_close(h.grad.cpu(), grad @ weight.double())
    running = torch.zeros(weight.shape, dtype=torch.bfloat16)  # the sum as it is kept: bf16 after each chunk
    for rows in torch.arange(40).split(8):
        running = (running.double() + grad[rows].t() @ hidden[rows].double()).bfloat16()
    assert_grad_close(w.grad.cpu(), running.double(), roundings=2)  # the GEMM's sum is fp32 before bf16
    # the exact path, for comparison: 1 GEMM per chunk forward, 3 per block of columns backward
    h.grad = w.grad = None
    with GemmCount() as forward:
        loss = fused_linear_pt_loss(h, w, *dev(targets, ut_mask), alpha=0.6, chunk_size=8, reduction="none")
    with GemmCount() as backward:
        loss.sum().backward()
    assert (forward.n, backward.n) == (5, 3 * 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_scale_is_multiplying_afterwards(backend, dtype):
    """train.py's call: the step's share 1 / n_mle passed in as scale (grad_output 1, gradients
    from forward) gives what multiplying the loss afterwards gave, and what the exact path gives."""
    gen = torch.Generator().manual_seed(30)
    hidden = torch.randn(45, 32, generator=gen).to(dtype)
    weight = (torch.randn(509, 32, generator=gen) / 32**0.5 * 3).to(dtype)
    _, targets, ut_mask = make_batch(45, 509, seed=31)
    w_mle, alpha_eff = 1 / 23, 1.7

    def run(loss_of):
        h, w = dev(hidden).requires_grad_(), dev(weight).requires_grad_()
        loss = loss_of(h, w, *dev(targets, ut_mask))
        loss.backward()
        return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()

    kw = dict(alpha=alpha_eff, chunk_size=16)
    passed_in = run(lambda h, w, t, u: fused_linear_pt_loss(h, w, t, u, reduction="sum", scale=w_mle, **kw))
    afterwards = run(lambda h, w, t, u: fused_linear_pt_loss(h, w, t, u, reduction="sum", **kw) * w_mle)
    exact = run(lambda h, w, t, u: fused_linear_pt_loss(h, w, t, u, reduction="none", **kw).sum() * w_mle)
    loss_tol, grad_tol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-6, 3 * GRAD_TOL[dtype])
    for other in (afterwards, exact):
        assert rel_err(passed_in[0], other[0]) <= loss_tol
        assert rel_err(passed_in[1], other[1]) <= grad_tol and rel_err(passed_in[2], other[2]) <= grad_tol


class GemmCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products (mm, addmm, bmm) run inside it: `with GemmCount() as c: ...; c.n`."""

    GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ in self.GEMMS
        return func(*args, **(kwargs or {}))


def test_fp32_accumulating_gemm_and_its_fallback():
    """torch.addmm(out_dtype=float32) is used only where it runs (asked once, by running it);
    the CPU backend lacks it, and the fallback gives the fp32 sum of the 16-bit products."""
    from kernels.fused_linear import add_product_fp32, fp32_out_gemm

    assert fp32_out_gemm(torch.device("cpu"), torch.bfloat16) is False
    gen = torch.Generator().manual_seed(32)
    a = torch.randn(300, 70, generator=gen).bfloat16()
    b = torch.randn(70, 50, generator=gen).bfloat16()
    acc = torch.randn(300, 50, generator=gen)
    expected = acc.double() + a.double() @ b.double()
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():  # on a GPU: whichever path the gate picks
        got = acc.to(device)
        add_product_fp32(got, a.to(device), b.to(device))
        assert rel_err(got.cpu(), expected) <= 1e-6, (device, fp32_out_gemm(torch.device(device), torch.bfloat16))


@pytest.mark.parametrize("go", [1.0, 0.37, 2.0])
def test_scale_by_grad_output(backend, go):
    """Backward's grad_output on gradients made in forward: in fp32 and rounded once, nothing
    changed at exactly 1."""
    from kernels.fused_linear import scale_by

    x = torch.randn(3000, generator=torch.Generator().manual_seed(33)).bfloat16()
    got = dev(x.clone())
    scale_by(got, dev(torch.tensor(go)))
    assert torch.equal(got.cpu(), (x.float() * go).bfloat16())


def test_fused_linear_peak_memory_is_a_tenth_of_eager(monkeypatch):
    """The memory accounting of `kernels.bench` (peak allocated during forward + backward beyond
    the inputs, gradients included), on the CPU: the training path stays under 1/10 of eager."""
    from kernels import bench

    monkeypatch.setattr(P, "_uses_triton", lambda x: False)  # the chunked PyTorch path: fast on a CPU
    cpu = torch.device("cpu")
    leaves, targets, ut_mask = bench.make_inputs(2048, 32000, 64, torch.float32, cpu)
    rest = (targets, ut_mask, 1.0)
    eager = bench.peak_mb(bench.step_for(lambda h, w, t, u, a: bench.eager_loss(h @ w.t(), t, u, a), leaves, rest), cpu)
    ours = bench.peak_mb(
        bench.step_for(lambda h, w, t, u, a: fused_linear_pt_loss(h, w, t, u, alpha=a, chunk_size=128), leaves, rest),
        cpu,
    )
    if eager is None or ours is None:
        pytest.skip("torch.profiler's allocation records changed")
    assert ours <= eager / 10, (ours, eager)


def test_fused_linear_one_side_and_parts(backend):
    gen = torch.Generator().manual_seed(17)
    hidden, weight = dev(torch.randn(20, 16, generator=gen), torch.randn(101, 16, generator=gen))
    _, targets, ut_mask = make_batch(20, 101, seed=18)
    targets, ut_mask = dev(targets, ut_mask)
    w = weight.clone().requires_grad_()
    loss, parts = fused_linear_pt_loss(hidden, w, targets, ut_mask, alpha=2.0, chunk_size=7, return_parts=True)
    loss.backward()
    z = (hidden @ weight.t()).requires_grad_()
    ref = pt_loss(z, targets, ut_mask, alpha=2.0)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6) and torch.allclose(parts.mle + 2.0 * parts.ut, loss, rtol=1e-6)
    assert torch.allclose(w.grad, z.grad.t() @ hidden, rtol=1e-5, atol=1e-7)
    # the first backward hands over the gradient made in forward; a second one rebuilds it
    # from the row stats (the exact path) and agrees
    w.grad = None
    loss = fused_linear_pt_loss(hidden, w, targets, ut_mask, alpha=2.0, chunk_size=7)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    assert torch.allclose(w.grad, 2 * first, rtol=1e-5, atol=1e-7)


# -----------------------------------------------------------------------------
# Errors a caller can make


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(logits=torch.zeros(4)), "logits must be a tensor of shape"),
        (dict(logits=torch.zeros(4, 10, dtype=torch.float64)), "logits dtype"),
        (dict(logits=torch.zeros(10, 4).t()), "contiguous along the vocabulary"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets must have shape \\(4,\\)"),
        (dict(targets=torch.zeros(4)), "targets must be an int64 or int32"),
        (dict(ut_mask=torch.zeros(4, dtype=torch.long)), "ut_mask must be a bool"),
        (dict(ut_mask=torch.zeros(3, dtype=torch.bool)), "ut_mask must have shape"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(reduction="avg"), "reduction must be one of"),
    ],
)
def test_bad_arguments(change, match):
    args = dict(
        logits=torch.zeros(4, 10),
        targets=torch.zeros(4, dtype=torch.long),
        ut_mask=torch.zeros(4, dtype=torch.bool),
        alpha=1.0,
        reduction="mean",
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        pt_loss(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=torch.zeros(4, 8, 2)), "hidden must be a 2-D tensor"),
        (dict(weight=torch.zeros(10, 9)), "weight must have shape \\(V, 8\\)"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.bfloat16)), "weight must have the dtype"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), "one entry per row of hidden"),
    ],
)
def test_bad_arguments_fused_linear(change, match):
    args = dict(
        hidden=torch.zeros(4, 8),
        weight=torch.zeros(10, 8),
        targets=torch.zeros(4, dtype=torch.long),
        ut_mask=torch.zeros(4, dtype=torch.bool),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_linear_pt_loss(**args)


def test_bench_row_of_a_failing_library():
    """An optional library that raises costs its own row of the benchmark table, not the table;
    one of ptalign's own methods raising still stops it."""
    from kernels import bench

    cpu = torch.device("cpu")
    leaves, targets, ut_mask = bench.make_inputs(8, 16, None, torch.float32, cpu)
    fails = lambda *args: 1 / 0  # noqa: E731
    rest = (targets, ut_mask, 1.0)
    row = bench.run_row(bench.Method("lib", "logits", fails, mle_only=True), leaves, rest, None, 1, {})
    assert row["check"].startswith("error: ZeroDivisionError") and "ms" not in row
    with pytest.raises(ZeroDivisionError):
        bench.run_row(bench.Method("ours", "logits", fails), leaves, rest, None, 1, {})
