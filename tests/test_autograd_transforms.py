"""Autograd beyond one backward, against torch.nn's modules: double backward (create_graph),
Hessian-vector products, forward-mode AD (dual tensors, torch.func.jvp), torch.func's
transforms nested (hessian, grad of grad, per-sample gradients by vmap of grad), jacrev,
batched gradients (is_grads_batched, autograd.functional's vectorize), and vmap of a module
call (model ensembles, batched inputs), which torch.nn's modules have no rule for (checked
against torch.nn's models one by one, or one call per slice).

The ops have formulas for none of the higher orders: fastrnn recomputes the forward by
torch.nn's own CPU computation (double backward, batched gradients) or runs
fastrnn.reference's plain PyTorch ops (forward-mode AD, nested grads). vmap, and one grad
inside or around it, run the fused ops through their batching rules.
Every result is compared with torch.nn's (in float64; double backward in float32 too),
dropout included (on the CPU fastrnn draws torch.nn's masks under the same seed)."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import CUDA, OpCalls, rnn_pair

F64 = dict(rtol=1e-9, atol=1e-10)

# (cell, constructor keyword arguments): every cell, stacked and bidirectional, LSTM's
# projection, dropout between layers.
MODULES = [
    ("rnn", dict(num_layers=2, bidirectional=True)),
    ("rnn", dict(num_layers=2, nonlinearity="relu", dropout=0.4)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=2, dropout=0.3)),
    ("lstm", dict(num_layers=2, dropout=0.4)),
    ("gru", dict(num_layers=2, bidirectional=True, dropout=0.4)),
    ("gru", dict(num_layers=1, bias=False)),
]
IDS = [f"{cell}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for cell, kw in MODULES]


def pair(cell, kwargs, seed=0):
    ref, fast = rnn_pair(3, 4, cell=cell, seed=seed, **kwargs)
    return ref.double(), fast.double()


def seeded(seed, fn, *args):
    torch.manual_seed(seed)
    return fn(*args)


def scalar(result):
    """A weighted sum of every output, so that each reaches the loss differently."""
    out, h = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    states = h if isinstance(h, tuple) else (h,)
    return sum(((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).sum()
                for t in (out, *states)), out.new_zeros(()))


def feeder(packed):
    """How an input [6, 2, 3] reaches the module: as it is, or packed with lengths 6 and 4."""
    if packed:
        return lambda x: pack_padded_sequence(x, torch.tensor([6, 4]))
    return lambda x: x


def gradient_penalty(module, dtype, feed=lambda x: x):
    """The gradients w.r.t. input and parameters, made with create_graph=True, and those of
    their squared norm."""
    x = torch.randn(6, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    params = list(module.parameters())
    first = torch.autograd.grad(scalar(seeded(3, module, feed(x))), [x, *params], create_graph=True)
    return (*first, *torch.autograd.grad(sum((g * g).sum() for g in first), [x, *params]))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_double_backward_like_torch(cell, kwargs, packed):
    ref, fast = pair(cell, kwargs)
    feed = feeder(packed)
    for got, want in zip(gradient_penalty(fast, torch.float64, feed),
                         gradient_penalty(ref, torch.float64, feed)):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_double_backward_in_float32_like_torch(cell, kwargs):
    """float32, where torch.nn's CPU LSTM runs oneDNN's layers: the recompute is torch.nn's."""
    ref, fast = rnn_pair(3, 4, cell=cell, **kwargs)
    for got, want in zip(gradient_penalty(fast, torch.float32), gradient_penalty(ref, torch.float32)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_double_backward_of_the_raw_op_like_its_reference():
    """The op called directly (its registered autograd) differentiates twice as well."""
    ref, fast = pair("rnn", dict(num_layers=2))
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    weights = list(fast._flat_weights)
    hx = torch.zeros(2, 2, 4, dtype=torch.float64, requires_grad=True)

    def run(call):
        out, h_n = call()
        first = torch.autograd.grad(out.square().sum() + h_n.sum(), [x, hx, *weights], create_graph=True)
        return torch.autograd.grad(sum(g.sin().sum() for g in first), [x, hx, *weights])

    got = run(lambda: torch.ops.fastrnn.rnn(x, hx, weights, True, 2, 0.0, False, False, "tanh", None)[:2])
    want = run(lambda: torch.func.functional_call(
        ref, dict(zip(ref._flat_weights_names, weights)), (x, hx)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("cell,kwargs", MODULES[:1] + MODULES[2:3] + MODULES[4:5], ids=IDS[:1] + IDS[2:3] + IDS[4:5])
def test_hessian_vector_product_and_hessian_like_torch(cell, kwargs):
    ref, fast = pair(cell, kwargs)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    want = torch.autograd.functional.hvp(lambda x: scalar(seeded(3, ref, x)), x, v)
    got = torch.autograd.functional.hvp(lambda x: scalar(seeded(3, fast, x)), x, v)
    torch.testing.assert_close(got, want, **F64)
    want = torch.func.hessian(lambda x: scalar(ref.eval()(x)))(x[:2, :1])
    got = torch.func.hessian(lambda x: scalar(fast.eval()(x)))(x[:2, :1])
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_forward_mode_ad_like_torch(cell, kwargs):
    """jvp w.r.t. the input and a parameter, by torch.func.jvp and by dual tensors."""
    ref, fast = pair(cell, kwargs)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    t = torch.randn_like(x)

    def jvp(module):
        name = "weight_hh_l0"
        w = getattr(module, name).detach()

        def f(x, w):
            return scalar(torch.func.functional_call(module, {name: w}, (x,)))
        return seeded(3, torch.func.jvp, f, (x, w), (t, torch.ones_like(w)))

    def dual(module):
        with fwAD.dual_level():
            out, _ = seeded(3, module, fwAD.make_dual(x, t))
            return fwAD.unpack_dual(out)

    for run in (jvp, dual):
        for got, want in zip(run(fast), run(ref)):
            torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_grad_of_grad_like_torch(cell, kwargs):
    """Nested torch.func.grad over functional_call: a meta-learning inner step."""
    ref, fast = pair(cell, kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def outer(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def inner_loss(p):
            return scalar(seeded(3, torch.func.functional_call, module, p, (x,)))

        def after_step(p):
            g = torch.func.grad(inner_loss)(p)
            return inner_loss({k: v - 0.1 * g[k] for k, v in p.items()})
        return torch.func.grad(after_step)(params)

    got, want = outer(fast), outer(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **F64, msg=k)


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_jacobians_like_torch(cell, kwargs):
    """torch.func.jacrev (vmap over the backward), autograd.functional.jacobian vectorized
    and not, and torch.autograd.grad's is_grads_batched."""
    ref, fast = pair(cell, kwargs)
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def jacobians(module):
        def h_n(x):
            h = seeded(3, module, x)[1]
            return h[0] if isinstance(h, tuple) else h
        xr = x.clone().requires_grad_()
        out = seeded(3, module, xr)[0]
        basis = torch.eye(out.numel(), dtype=x.dtype)[:7].view(7, *out.shape)
        return (torch.func.jacrev(h_n)(x),
                torch.autograd.functional.jacobian(h_n, x, vectorize=True),
                torch.autograd.functional.jacobian(h_n, x),
                *torch.autograd.grad(out, [xr, *module.parameters()], basis, is_grads_batched=True))

    for got, want in zip(jacobians(fast), jacobians(ref)):
        torch.testing.assert_close(got, want, **F64)


def test_jacrev_calls_the_backward_op_once_per_row():
    """jacrev's vmap over the backward reaches fastrnn's backward op once per row of the
    Jacobian (fastrnn::*_backward's batching rule), after one forward op call."""
    _, fast = pair("rnn", dict(num_layers=2))
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    with OpCalls() as calls:
        torch.func.jacrev(lambda x: fast(x)[1])(x)
    assert calls.names() == ["rnn"] + ["rnn_backward"] * (2 * 2 * 4)


def leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


def member(result, i):
    """Slice i of a vmapped module call's (output, states)."""
    return torch.utils._pytree.tree_map(lambda t: t[i], result)


def scalars(result, count):
    """scalar() of each of a vmapped call's slices, summed."""
    return sum(scalar(member(result, i)) for i in range(count))


def ensemble(cell, kwargs, members=3):
    """members fastrnn modules of one configuration and different weights (eval mode), their
    stacked parameters and buffers (torch.func.stack_module_state), and a function of them
    and an input that vmap runs: the ensemble."""
    models = [pair(cell, kwargs, seed=s)[1].eval() for s in range(members)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return models, params, buffers, lambda p, b, x: torch.func.functional_call(base, (p, b), (x,))


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_vmap_over_inputs_is_one_op_call(cell, kwargs):
    """torch.nn's modules cannot be vmapped; fastrnn's can. Over inputs and initial states
    only, without gradients, the vmapped dimension joins the batch: one op call."""
    _, fast = pair(cell, kwargs)
    fast.eval()
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    with OpCalls() as calls, torch.no_grad():
        got = torch.func.vmap(fast)(xs)
    assert calls.names() == [cell]
    for i in range(xs.shape[0]):
        for g, w in zip(leaves(got), leaves(fast(xs[i]))):
            torch.testing.assert_close(g[i], w, **F64)
    # Batched initial states too: (h0, c0) for an LSTM, shaped as the final states.
    h0 = [torch.randn(3, *t.shape[1:], dtype=torch.float64) for t in leaves(got)[1:]]
    state = tuple if cell == "lstm" else (lambda h: h[0])
    with torch.no_grad():
        got = torch.func.vmap(lambda x, *h: fast(x, state(h)))(xs, *h0)
    for i in range(xs.shape[0]):
        for g, w in zip(leaves(got), leaves(fast(xs[i], state([h[i] for h in h0])))):
            torch.testing.assert_close(g[i], w, **F64)


@pytest.mark.parametrize("cell,kwargs", MODULES, ids=IDS)
def test_vmap_of_an_ensemble_and_its_gradients_like_torch(cell, kwargs):
    """A model ensemble (torch.func.stack_module_state, vmap over the stacked parameters):
    one fused forward and backward op call per model; outputs, and the gradients that
    backward leaves in the stacked parameters, equal each torch.nn model's own."""
    models, params, buffers, run = ensemble(cell, kwargs)
    refs = [pair(cell, kwargs, seed=s)[0].eval() for s in range(len(models))]
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with OpCalls() as calls:
        got = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        scalars(got, len(models)).backward()
    assert calls.names() == [cell] * len(models) + [f"{cell}_backward"] * len(models)
    for i, ref in enumerate(refs):
        want = ref(x)
        for g, w in zip(leaves(got), leaves(want)):
            torch.testing.assert_close(g[i], w, **F64)
        scalar(want).backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, **F64, msg=name)


def test_grad_of_an_ensemble_inside_torch_func():
    """torch.func.grad of a vmapped ensemble's loss (training an ensemble functionally): the
    fused ops, each model's gradients its own."""
    models, params, buffers, run = ensemble("gru", dict(num_layers=2, bidirectional=True))
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def loss(p):
        return scalars(torch.func.vmap(run, in_dims=(0, 0, None))(p, buffers, x), len(models))

    with OpCalls() as calls:
        got = torch.func.grad(loss)(params)
    assert calls.names() == ["gru"] * 3 + ["gru_backward"] * 3
    for i, model in enumerate(models):
        want = torch.autograd.grad(scalar(model(x)), list(model.parameters()))
        for (name, _), w in zip(model.named_parameters(), want):
            torch.testing.assert_close(got[name][i], w, **F64, msg=name)


@pytest.mark.parametrize("cell,kwargs", [MODULES[1], MODULES[3], MODULES[4]],
                         ids=[IDS[1], IDS[3], IDS[4]])
def test_vmap_with_dropout_follows_its_randomness(cell, kwargs):
    """Dropout drawn under vmap: randomness="error" raises as torch's random ops do;
    "different" draws each slice's masks in turn (as calls one after another would under the
    same seed), "same" one set for every slice."""
    _, fast = pair(cell, kwargs)
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(fast)(xs)
    got = seeded(5, torch.func.vmap(fast, randomness="different"), xs)
    torch.manual_seed(5)
    for i in range(xs.shape[0]):
        for g, w in zip(leaves(got), leaves(fast(xs[i]))):
            torch.testing.assert_close(g[i], w, **F64)
    got = seeded(5, torch.func.vmap(fast, randomness="same"), xs)
    for i in range(xs.shape[0]):
        for g, w in zip(leaves(got), leaves(seeded(5, fast, xs[i]))):
            torch.testing.assert_close(g[i], w, **F64)
    assert not torch.equal(leaves(got)[0][0], leaves(seeded(6, fast, xs[0]))[0])


@pytest.mark.parametrize("cell,kwargs", MODULES + [("rnn", {})], ids=IDS + ["rnn-1-layer"])
def test_per_sample_gradients(cell, kwargs):
    """vmap of grad over the samples of a batch (differential privacy's per-sample gradients):
    each equals the gradient of that sample alone. One fused forward op call for the whole
    batch, one backward call per sample (each sample's weight gradients are its own sums)."""
    _, fast = pair(cell, kwargs)
    fast.eval()  # (dropout would need vmap's randomness flag)
    x = torch.randn(5, 3, 3, dtype=torch.float64)  # [T, B, I]
    params = {k: v.detach() for k, v in fast.named_parameters()}

    def loss(p, sample):  # sample [T, I]: unbatched input
        return scalar(torch.func.functional_call(fast, p, (sample,)))

    with OpCalls() as calls:
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, x)
    assert calls.names() == [cell] + [f"{cell}_backward"] * 3
    for b in range(x.shape[1]):
        want = torch.func.grad(loss)(params, x[:, b])
        for k in params:
            torch.testing.assert_close(got[k][b], want[k], **F64, msg=k)


def test_one_backward_still_runs_the_ops():
    """None of this touches a plain backward: one forward and one backward op call."""
    _, fast = pair("gru", dict(num_layers=2, bidirectional=True))
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with OpCalls() as calls:
        scalar(fast(x)).backward()
        torch.func.grad(lambda x: scalar(fast(x)))(x.detach())
    assert calls.names() == ["gru", "gru_backward"] * 2


@CUDA
@pytest.mark.parametrize("cell,kwargs", [MODULES[0], MODULES[2], MODULES[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_double_backward_and_jvp_on_cuda_like_the_cpu(cell, kwargs):
    """The same routes on a GPU (float64, no dropout drawn: eval mode): equal to the CPU's."""
    _, fast = pair(cell, kwargs)
    fast.eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def run(module, x):
        x = x.clone().requires_grad_()
        first = torch.autograd.grad(scalar(module(x)), [x, *module.parameters()], create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), [x, *module.parameters()])
        tangent = torch.func.jvp(lambda x: scalar(module(x)), (x.detach(),), (torch.ones_like(x),))
        return (*first, *second, *tangent)

    want = run(fast, x)
    got = run(copy.deepcopy(fast).cuda(), x.cuda())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, **F64)


@CUDA
@pytest.mark.parametrize("cell,kwargs", [MODULES[0], MODULES[2], MODULES[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_vmap_on_cuda_like_the_cpu(cell, kwargs):
    """vmap's batching rules on a GPU, equal to the CPU's: an ensemble's forward+backward (one
    call per model), inputs joined into one call's batch, and per-sample gradients (joined,
    the reserve regrouped by sample)."""
    models, params, buffers, run = ensemble(cell, kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)

    def results(device):
        p = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        b = {k: v.to(device) for k, v in buffers.items()}
        out = torch.func.vmap(run, in_dims=(0, 0, None))(p, b, x.to(device))
        scalars(out, len(models)).backward()
        module = copy.deepcopy(models[0]).to(device)
        with OpCalls() as calls, torch.no_grad():
            joined = torch.func.vmap(module)(xs.to(device))
        assert calls.names() == [cell]
        fixed = {k: v.detach() for k, v in module.named_parameters()}
        per_sample = torch.func.vmap(torch.func.grad(
            lambda q, sample: scalar(torch.func.functional_call(module, q, (sample,)))),
            in_dims=(None, 1))(fixed, x.to(device))
        return [t.cpu() for t in (*leaves(out), *(p[k].grad for k in sorted(p)), *leaves(joined),
                                  *(per_sample[k] for k in sorted(per_sample)))]

    for g, w in zip(results("cuda"), results("cpu")):
        torch.testing.assert_close(g, w, **F64)
